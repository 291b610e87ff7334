"""tinyuvit explain (tinyuvit.tools.explain, Run.explain): what it reads out of the network is
what the network computes (hand-set weights where the answer is known), the pictures come out
for every ablation variant that has the part, and bad options are one-line errors."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

import tinyuvit
from tinyuvit.backend import Backend, cupy_status, to_numpy
from tinyuvit.errors import CheckpointError, ConfigError
from tinyuvit.layers import sincos_2d, timestep_embedding, unpatchify
from tinyuvit.model import UViT, UViTConfig, ablations
from tinyuvit.tools.checkpoint import save_checkpoint
from tinyuvit.tools.cli import main
from tinyuvit.tools.explain import (
    forward_without_skip,
    learned_positions,
    position_similarity,
    probed,
    token_map,
    traced_forward,
)

SMALL = dict(dim=16, depth=2, num_heads=2)      # 3 blocks: in 1, mid, out 1
FEW_STEPS = dict(steps=4)                       # sampler steps: enough to draw every picture


def small_model(backend="cpu", dtype="float64", seed=0, **overrides):
    return UViT(UViTConfig(**{**SMALL, **overrides}), seed=seed).to(Backend(backend, dtype))


def inputs(model, B=2, seed=0):
    """x_t [B, 1, 28, 28], t [B], y [B] on the model's backend (the last label null)."""
    rng = np.random.default_rng(seed)
    xp = model.xp
    x = xp.asarray(rng.standard_normal((B, 1, 28, 28)), dtype=model.dtype)
    t = xp.asarray(rng.integers(0, 1000, B))
    y = xp.asarray(np.array([3] * (B - 1) + [model.cfg.num_classes]))
    return x, t, y


def save_run(folder, weak=True, **overrides):
    """A checkpoint of a fresh small model, as an old run would have saved it: the config holds
    only the model (eps prediction, linear schedule are what such runs used)."""
    model = UViT(UViTConfig(**{**SMALL, **overrides}), seed=1)
    state = {k: np.asarray(v, np.float32) for k, v in model.state_dict().items()}
    path = os.path.join(folder, "checkpoint.npz")
    os.makedirs(folder, exist_ok=True)
    save_checkpoint(path, params={}, ema=state, opt_state={}, opt_k=0, step=7, config={"model": model.cfg.to_dict()},
                    weak=state if weak else None, weak_step=3 if weak else None)
    return path


# ----------------------------------------------------------------------------------------
# What is read out is what the network computes
# ----------------------------------------------------------------------------------------

def test_label_token_made_to_attend_one_patch_lights_that_patch():
    """Hand-set weights: patches carry nothing but the target's position, the label token's query
    and the target's key point the same way, so the label token looks at the target alone."""
    model = small_model()
    D, e, grid, target = model.cfg.dim, model.extras, 7, (2, 5)
    q_target = e + target[0] * grid + target[1]
    model.patch_embed.proj.params["W"][...] = 0.0            # every patch token starts as zero ...
    pos = np.zeros((1, e + grid * grid, D))
    pos[0, q_target, 2] = 10.0                                # ... but the target's position: along dim 2
    model.pos_embed.params["pos"] = pos
    model.label_embed.params["W"][...] = 0.0
    model.label_embed.params["W"][:, 1] = 10.0                # every label along dim 1
    blk = model.in_blocks[0]
    W = np.zeros((D, 3 * D))
    hd = D // blk.attn.num_heads
    for h in range(blk.attn.num_heads):
        W[1, h * hd] = 20.0                                   # q of head h reads dim 1 (the label) ...
        W[2, D + h * hd] = 1.0                                # ... k of head h reads dim 2 (the target)
    blk.attn.qkv.params["W"] = W
    _, maps, _ = traced_forward(probed(model), *inputs(model))
    amap = token_map(maps[0][0], 0, e, grid)                  # block 'in 1', image 0, the label token
    assert np.unravel_index(np.argmax(amap), amap.shape) == target
    assert amap[target] > 0.99


def test_attention_rows_sum_to_one(backend):
    model = small_model(backend, depth=4)
    _, maps, norms = traced_forward(probed(model), *inputs(model, B=3))
    assert len(maps) == 5 and len(norms) == 2
    L = model.extras + 49
    for a in maps:
        assert a.shape == (3, 2, L, L) and isinstance(a, np.ndarray)
        assert (a >= 0).all()
        np.testing.assert_allclose(a.sum(axis=-1), 1.0, atol=1e-12)


def test_traced_forward_gives_the_models_output_and_changes_nothing(backend):
    model = small_model(backend)
    x, t, y = inputs(model)
    before = to_numpy(model.forward(x, t, y, train=False))
    out, _, _ = traced_forward(probed(model), x, t, y)
    np.testing.assert_allclose(to_numpy(out), before, atol=1e-12)
    assert all(m.cache is None for _, m in model.modules())  # the replica kept the caches, not the model


def test_position_similarity_is_symmetric_with_unit_diagonal_and_sincos_at_init():
    fresh = small_model(pos_init="sincos2d")
    sim = position_similarity(learned_positions(fresh))
    np.testing.assert_allclose(sim, sim.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-12)
    np.testing.assert_allclose(sim, position_similarity(sincos_2d(7, 16)), atol=1e-12)
    other = position_similarity(learned_positions(small_model(pos_init="normal")))   # N(0, 0.02): not the table
    np.testing.assert_allclose(np.diag(other), 1.0, atol=1e-12)
    assert np.abs(other - sim).max() > 0.5
    assert learned_positions(small_model(pos_embed="sincos2d")) is None
    assert learned_positions(small_model(pos_embed="none")) is None


def forward_zeroing_skip(model, x, t, y, j):
    """UViT's forward written out here, with out-block j's long-skip input set to zero."""
    cfg = model.cfg
    xp = model.xp
    h = model.patch_embed(x, train=False)                                        # [B, N, D]
    time = timestep_embedding(t, cfg.dim, model.dtype)
    label = model.label_embed(y, train=False)[:, None]
    h = xp.concatenate([label, time[:, None], h], axis=1)                        # [B, 2+N, D]
    h = model.pos_embed(h, train=False)
    skips = []
    for blk in model.in_blocks:
        h = blk(h, train=False)
        skips.append(h)
    h = model.mid_block(h, train=False)
    for k, blk in enumerate(model.out_blocks):
        s = skips.pop()
        h = blk(h, xp.zeros_like(s) if k == j else s, train=False)
    h = model.decoder_pred(model.norm(h, train=False), train=False)[:, model.extras:]
    return model.final_layer(unpatchify(h, cfg.patch_size, cfg.in_chans), train=False)


@pytest.mark.parametrize("skip", ["concat", "add", "add_linear", "linear_add"])
def test_zeroing_a_skip_equals_a_forward_with_that_skip_input_zero(backend, skip):
    model = small_model(backend, depth=4, skip=skip)
    x, t, y = inputs(model)
    intact = to_numpy(model.forward(x, t, y, train=False))
    for j in range(2):
        zeroed = to_numpy(forward_without_skip(model, x, t, y, j))
        np.testing.assert_allclose(zeroed, to_numpy(forward_zeroing_skip(model, x, t, y, j)), atol=1e-12)
        assert np.abs(zeroed - intact).max() > 1e-6                              # the skip mattered
    np.testing.assert_allclose(to_numpy(forward_zeroing_skip(model, x, t, y, None)), intact, atol=1e-12)


def test_zeroing_a_concat_skip_equals_zeroing_its_half_of_the_linear():
    """Linear(concat(h_m, 0)) = h_m W_m + b: the same as a network whose W_s rows are zero."""
    model = small_model(depth=4)
    x, t, y = inputs(model)
    for j in range(2):
        cut = small_model(depth=4)
        cut.out_blocks[j].skip_linear.params["W"][model.cfg.dim:] = 0.0
        np.testing.assert_allclose(to_numpy(forward_without_skip(model, x, t, y, j)),
                                   to_numpy(cut.forward(x, t, y, train=False)), atol=1e-12)


# ----------------------------------------------------------------------------------------
# The pictures, for every variant of the ablation study
# ----------------------------------------------------------------------------------------

ALL = ["explain_1_emergence.png", "explain_2_tokens.png", "explain_2_patch.png", "explain_2_heads.png",
       "explain_2_share.png", "explain_3_positions.png", "explain_4_skip_norms.png",
       "explain_4_skips_zeroed.png", "explain.json"]


@pytest.mark.parametrize("name,overrides", [(n, o) for n, _, o in ablations()], ids=[n for n, _, _ in ablations()])
def test_pictures_come_out_for_every_variant(tmp_path, name, overrides):
    run = tinyuvit.load(save_run(str(tmp_path / "run"), **overrides))
    heard = []
    res = run.explain(tmp_path / "out", digit=5, seed=1, log=heard.append, **FEW_STEPS)
    missing = set()
    if overrides.get("pos_embed") in ("sincos2d", "none"):
        missing.add("explain_3_positions.png")
        assert any("learns no positions" in n and overrides["pos_embed"] in n for n in heard)
    if overrides.get("skip") == "none":
        missing |= {"explain_4_skip_norms.png", "explain_4_skips_zeroed.png"}
        assert any("no long skips" in n for n in heard)
    if overrides.get("time_cond") == "adaln":
        assert any("no time token" in n for n in heard)
    assert heard == res["notes"]
    assert sorted(os.listdir(tmp_path / "out")) == sorted(set(ALL) - missing)
    assert [os.path.basename(f) for f in res["files"]] == [f for f in ALL if f not in missing]
    measures = json.loads((tmp_path / "out" / "explain.json").read_text())
    assert measures["digit"] == 5 and len(measures["sigmas"]) == 4
    assert ("time_share" in measures["attention"]) == (overrides.get("time_cond") != "adaln")


def test_explain_samples_the_digit_that_sample_draws(tmp_path):
    run = tinyuvit.load(save_run(str(tmp_path / "run")))
    res = run.explain(tmp_path / "out", digit=4, seed=2, **FEW_STEPS)
    image = np.round((np.clip(res["image"], -1, 1) + 1) * 127.5)
    drawn = run.sample(digits=[4], count=1, seed=2, **FEW_STEPS)[0]
    assert np.abs(image - drawn).max() <= 1          # the tracer's doubled batch rounds a little differently
    assert res["patch"] == tuple(res["measures"]["patch"])


def test_bad_values_are_refused_before_any_work(tmp_path):
    run = tinyuvit.load(save_run(str(tmp_path / "run")))
    (tmp_path / "afile").write_text("x")
    for kwargs, option in [(dict(digit=10), "--digit"), (dict(digit="3"), "--digit"), (dict(seed=-1), "--seed"),
                           (dict(patch=(7, 0)), "--patch"), (dict(patch=(1,)), "--patch"),
                           (dict(steps=0), "--steps")]:
        with pytest.raises(ConfigError, match=option):
            run.explain(tmp_path / "out", **kwargs)
    with pytest.raises(ConfigError, match="is a file"):
        run.explain(tmp_path / "afile")
    with pytest.raises(ConfigError, match="is a file"):
        run.explain(tmp_path / "afile" / "below")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------

def test_cli_help_shows_an_example():
    r = CliRunner().invoke(main, ["explain", "--help"])
    assert r.exit_code == 0
    assert "tinyuvit explain --checkpoint" in r.output and "explain_3_positions.png" in r.output


def test_cli_writes_the_pictures(tmp_path):
    path = save_run(str(tmp_path / "run"))
    r = CliRunner().invoke(main, ["explain", "--checkpoint", str(tmp_path / "run"), "--digit", "2", "--patch", "3,4",
                                  "--quiet"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "run" / "explain"                    # the default: beside the checkpoint
    assert sorted(os.listdir(out)) == sorted(ALL)
    assert f"wrote {out / 'explain_1_emergence.png'}" in r.output
    assert "patch (3, 4): as asked" in r.output and os.path.exists(path)


def test_cli_bad_options_are_one_line_errors(tmp_path):
    path = save_run(str(tmp_path / "run"))
    (tmp_path / "afile").write_text("x")
    cases = [(["--digit", "10"], "--digit"), (["--seed", "-1"], "--seed"), (["--patch", "3"], "--patch"),
             (["--patch", "0,7"], "--patch"), (["--out", str(tmp_path / "afile")], "is a file")]
    if not cupy_status()[0]:
        cases.append((["--device", "gpu"], "--device cpu"))
    for args, says in cases:
        r = CliRunner().invoke(main, ["explain", "--checkpoint", path, "--quiet"] + args)
        assert r.exit_code == 1, (args, r.output)
        assert r.output.startswith("Error: ") and says in r.output and len(r.output.strip().splitlines()) == 1
        assert "Traceback" not in r.output
    r = CliRunner().invoke(main, ["explain", "--checkpoint", str(tmp_path / "nowhere.npz")])
    assert r.exit_code == 1 and r.output.startswith("Error: checkpoint") and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "explain").exists()
    with pytest.raises(CheckpointError):
        tinyuvit.load(tmp_path / "nowhere.npz")
