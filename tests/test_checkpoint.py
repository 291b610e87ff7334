"""Checkpoints that are not what they should be: each is one CheckpointError line naming the file,
what is wrong and what can be done, never a traceback; saves that fail say what survived."""
import errno
import json

import numpy as np
import pytest

from tinyuvit.tools import checkpoint
from tinyuvit.tools.checkpoint import RESUME, CheckpointError, load_checkpoint, save_checkpoint
from tinyuvit.model import UViT, UViTConfig
from tinyuvit.config import TrainConfig

TINY = dict(dim=16, depth=2, num_heads=2)


def run_config(**changes):
    cfg = TrainConfig(steps=4, batch_size=4, model_overrides=TINY).to_dict()
    cfg.update(changes)
    return cfg


def arrays_of(config, step=2):
    """The arrays of a whole checkpoint for `config`, as save_checkpoint writes them."""
    params = UViT(UViTConfig.from_dict(config["model"])).state_dict()
    ema = {k: v * 0.5 for k, v in params.items()}
    opt = {f"{mv}.{k}": np.full_like(v, 1e-3) for k, v in params.items() for mv in ("m", "v")}
    return dict(params=params, ema=ema, opt_state=opt, opt_k=step, step=step, config=config)


@pytest.fixture
def good(tmp_path):
    """A whole checkpoint in the run folder tmp_path / "run"."""
    path = tmp_path / "run" / "checkpoint.npz"
    save_checkpoint(path, **arrays_of(run_config()))
    return path


def rewrite(path, drop=(), **entries):
    """Rewrite the checkpoint at path without the keys in `drop`, with `entries` set."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k not in drop}
    arrays.update({k.replace("__", "/"): v for k, v in entries.items()})
    np.savez(path, **arrays)


def refused(path, *words, need=RESUME):
    """Load must fail with one CheckpointError line naming the file and holding `words`."""
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, need=need)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for w in words:
        assert w in message, message
    return message


def test_whole_checkpoint_loads_from_its_file_or_its_run_folder(good):
    ck = load_checkpoint(good)
    assert ck["step"] == 2 and ck["opt_k"] == 2 and ck["path"] == str(good)
    assert len(ck["opt"]) == 2 * len(ck["params"]) == 2 * len(ck["ema"])
    assert load_checkpoint(good.parent)["path"] == str(good)
    good.unlink()
    refused(good.parent, "holds no checkpoint.npz")
    refused(good, "not found")


def test_files_that_are_not_checkpoints(tmp_path, good):
    text = tmp_path / "notes.npz"
    text.write_text("step 3, lr 0.002\n")
    message = refused(text, "not a tinyuvit checkpoint")
    assert "pickle" not in message                        # no advice to unpickle anything
    npy = tmp_path / "weights.npy"
    np.save(npy, np.zeros(3))
    refused(npy, "not a tinyuvit checkpoint")
    objects = tmp_path / "objects.npz"
    np.savez(objects, step=np.array([object()], dtype=object))
    refused(objects, "pickled (object) arrays", "does not load")
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    refused(other, "no 'step' entry")
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    refused(empty, "is empty", "another --out")


def test_truncated_checkpoint_says_what_can_be_done(good):
    raw = good.read_bytes()
    good.write_bytes(raw[: len(raw) // 2])
    message = refused(good, "unreadable", "truncated or corrupt", "start a new run with another --out")
    assert "earlier one" not in message


@pytest.mark.parametrize("config, words", [
    ([1, 2], "a JSON list, not an object"),
    ("no model", "no model configuration"),
    ("model null", "no model configuration"),
    ({"T": 0}, "T must be a whole number >= 2"),
    ({"lr": float("nan")}, "learning rate"),
    ({"sampler": "euler"}, "must be one of dpm++"),
    ({"steps": "many"}, "invalid config"),
    ("model field", "unknown model config fields"),
    ("model patch", "patch_size 5 must divide img_size 28"),
    ("not json", "corrupt JSON"),
])
def test_edited_configs(good, config, words):
    cfg = run_config()
    if config == "no model":
        del cfg["model"]
    elif config == "model null":
        cfg["model"] = None
    elif config == "model field":
        cfg["model"]["depht"] = 3
    elif config == "model patch":
        cfg["model"]["patch_size"] = 5
    elif isinstance(config, dict):
        cfg.update(config)
    else:
        cfg = config
    text = "{not json" if config == "not json" else json.dumps(cfg)
    rewrite(good, config=np.array(text))
    refused(good, "invalid config", words, "edited or damaged", need=())


def test_unknown_config_fields_are_records_not_errors(good):
    rewrite(good, config=np.array(json.dumps(run_config(data={"source": "full MNIST"}))))
    assert load_checkpoint(good)["config"]["data"] == {"source": "full MNIST"}


@pytest.mark.parametrize("key, value, words", [
    ("step", np.array([2, 3]), "shape (2,)"),
    ("step", np.array(-1), "(-1)"),
    ("opt_k", np.array(2.5), "float64"),
])
def test_step_and_opt_k_must_be_counts(good, key, value, words):
    rewrite(good, **{key: value})
    refused(good, f"'{key}' must be one integer >= 0", words, need=())


def test_missing_arrays_refuse_resume_but_ema_alone_samples(good):
    name = sorted(load_checkpoint(good)["params"])[0]
    rewrite(good, drop=[f"param/{name}"])
    refused(good, "lacks 1 of the", "weights", name)
    assert load_checkpoint(good, need=("ema",))["ema"][name].shape  # sampling needs only the EMA
    with np.load(good) as z:
        keep = [k for k in z.files if not k.startswith(("param/", "opt/"))]
    rewrite(good, drop=[k for k in np.load(good).files if k not in keep])
    ck = load_checkpoint(good, need=("ema",))
    assert ck["params"] == {} and ck["opt"] == {} and ck["ema"]
    refused(good, "only the EMA weights for sampling", "tinyuvit export")   # what export writes
    refused(good, "only the EMA weights for sampling", "raw weights", need=("params",))


def test_missing_optimizer_moment_and_extra_arrays(good):
    name = sorted(load_checkpoint(good)["params"])[-1]
    rewrite(good, drop=[f"opt/v.{name}"])
    refused(good, "AdamW moments", f"v.{name}", "incomplete")
    load_checkpoint(good, need=("params", "ema"))
    rewrite(good, ema__extra_W=np.zeros(3, np.float32))
    refused(good, "EMA weights that the model in its config does not have (e.g. extra_W)", need=("ema",))


def test_wrong_shape_wrong_type_and_nan(good):
    ck = load_checkpoint(good)
    name = next(k for k, v in ck["ema"].items() if v.ndim == 2)
    rows, cols = ck["ema"][name].shape
    rewrite(good, **{f"ema__{name}": np.zeros((cols, rows + 1), np.float32)})
    refused(good, f"EMA weights {name} has shape ({cols}, {rows + 1})", f"needs ({rows}, {cols})")
    rewrite(good, **{f"ema__{name}": np.zeros((rows, cols), np.int64)})
    refused(good, "is int64, not floating point")
    bad = np.zeros((rows, cols), np.float32)
    bad[0, 0] = np.nan
    rewrite(good, **{f"ema__{name}": bad})
    refused(good, "NaN or infinite", "lower --lr", need=("ema",))


def test_need_names_known_groups(good):
    with pytest.raises(ValueError, match="unknown groups"):
        load_checkpoint(good, need=("weights",))


# ----- saving ----------------------------------------------------------------------------------

def test_full_disk_keeps_the_previous_checkpoint_and_says_so(good, monkeypatch):
    before = good.read_bytes()

    def full_disk(f, **arrays):
        f.write(b"some of it")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.np, "savez", full_disk)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(good, **arrays_of(run_config(), step=4))
    message = str(info.value)
    assert message.startswith(f"could not save checkpoint {good} at step 4: the disk is full; "
                              "the previous checkpoint there is kept whole (step 2)")
    assert "--resume" in message and "\n" not in message
    assert good.read_bytes() == before
    assert sorted(p.name for p in good.parent.iterdir()) == ["checkpoint.npz"]   # no .part left


def test_unwritable_folder_says_no_checkpoint_survived(tmp_path):
    (tmp_path / "file").write_text("a file where the run folder should be")
    path = tmp_path / "file" / "checkpoint.npz"
    with pytest.raises(CheckpointError, match="no earlier checkpoint exists") as info:
        save_checkpoint(path, **arrays_of(run_config()))
    assert str(path) in str(info.value)
    assert checkpoint.checkpoint_step(path) is None


# ----- the classifier trainer ------------------------------------------------------------------

@pytest.mark.parametrize("options, words", [
    (dict(epochs=float("nan")), "--epochs must be a finite number > 0, got nan"),
    (dict(epochs=float("inf")), "--epochs must be a finite number > 0, got inf"),
    (dict(epochs=0), "--epochs must be a finite number > 0, got 0"),
    (dict(epochs=-2.0), "--epochs"),
    (dict(lr=float("nan")), "--lr must be a finite number > 0, got nan"),
    (dict(lr=float("inf")), "--lr"),
    (dict(lr=0.0), "--lr"),
    (dict(batch_size=0), "--batch-size must be an integer >= 1, got 0"),
    (dict(batch_size=2.5), "--batch-size"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(weight_decay=-1.0), "weight_decay"),
])
def test_classifier_options_out_of_range(tmp_path, options, words):
    from tinyuvit.errors import ConfigError
    from tinyuvit.tools.vit import train_classifier
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        train_classifier(tmp_path / "c.npz", progress=False, **options)
    assert not (tmp_path / "c.npz").exists()


def test_classifier_epochs_that_train_no_step(tmp_path, offline):
    from tinyuvit.errors import ConfigError
    from tinyuvit.tools.vit import train_classifier
    with pytest.raises(ConfigError, match=r"--epochs 0.001 trains 0 steps of 128 on 10000 digits; "
                                          r"give --epochs >= 0.013"):
        train_classifier(tmp_path / "c.npz", epochs=0.001, progress=False)


def test_classifier_output_path_is_checked_first(good):
    from tinyuvit.errors import ConfigError
    from tinyuvit.tools.vit import train_classifier
    with pytest.raises(ConfigError, match="is a training checkpoint"):
        train_classifier(good, progress=False)
    with pytest.raises(ConfigError, match="does not exist"):
        train_classifier(good.parent / "missing" / "c.npz", progress=False)


def test_classifier_with_nan_weights_is_not_saved(tmp_path, offline, monkeypatch):
    from tinyuvit.tools import vit
    from tinyuvit.errors import TrainingError

    def diverge(model, *args, **kwargs):
        model.head.params["W"][...] = np.nan
        return float("nan"), 0.1, 1000.0

    monkeypatch.setattr(vit, "fit", diverge)
    out = tmp_path / "c.npz"
    with pytest.raises(TrainingError, match=r"diverged: after 1 steps 1 weight arrays \(e.g. head.W\) "
                                            r"hold NaN .* nothing was saved .* lower --lr"):
        vit.train_classifier(out, steps=1, progress=False,
                             config=vit.ViTConfig(dim=16, depth=1, num_heads=2))
    assert not out.exists()
