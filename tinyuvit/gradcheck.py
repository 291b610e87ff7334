"""Check every hand-written backward against finite differences and against HIPS autograd.

For a layer f with input(s) x and parameters P, a random cotangent c (never all ones) defines
the scalar L = sum(f(x; P) * c). The layer's `backward(c)` must return dL/dx and fill dL/dP.
Each gradient tensor is compared with two references:

- central finite differences, dL/dz_i ~ (f(z + h e_i) - f(z - h e_i)) . c / 2h with h = 1e-6,
  at a random subset of entries (every entry of a small tensor; the entry where the hand
  gradient is largest is always included, so that the error is measured against the tensor's
  real scale);
- HIPS autograd's gradient of L, traced through the very same forward code, at every entry
  (`tinyuvit.backend.xp_of` hands the forward autograd.numpy while it is tracing).

The relative error of a tensor is  max_i |hand_i - ref_i| / max(max_i |ref_i|, tiny),  the max
over the compared entries, `tiny` the smallest positive float64. A tensor passes when it is at
most 1e-6 against finite differences and at most 1e-10 against autograd.

Everything runs in float64. Parameters are redrawn (the init plus N(0, 0.3) noise) before a
check, so that no gradient is trivially zero or symmetric, e.g. LayerNorm's g = 1, b = 0 or
the near-uniform attention of a 0.02 init. autograd is a test-only dependency: without it
the autograd column reads "skipped" and only finite differences decide.
"""
import sys
import time
from collections import namedtuple
from dataclasses import replace

import numpy as np

from .layers import (GELU, MLP, AdaLN, Attention, Block, Conv3x3, ConvPatchEmbed, LabelEmbedding, LayerNorm,
                     Linear, Module, PatchEmbed, PosEmbed, SinCosPosEmbed, Softmax, patchify, unpatchify)
from .model import UViT, UViTConfig, ablations

try:  # test-only dependency
    import autograd
    import autograd.numpy as anp
except ImportError:
    autograd = None

FD_TOL, AG_TOL = 1e-6, 1e-10
FD_STEP = 1e-6
_TINY = np.finfo(np.float64).tiny

Row = namedtuple("Row", "layer tensor fd ag ok")  # ag is None when autograd is missing


def rel_err(hand, ref):
    """max|hand - ref| / max(max|ref|, tiny), over all entries given."""
    hand, ref = np.asarray(hand, np.float64), np.asarray(ref, np.float64)
    if hand.size == 0:
        return 0.0
    return float(np.max(np.abs(hand - ref)) / max(float(np.max(np.abs(ref))), _TINY))


class Unpatchify(Module):
    """`unpatchify` as a layer: it only permutes entries, so its backward is the inverse
    permutation, `patchify`."""

    def __init__(self, p, C):
        super().__init__()
        self.p, self.C = p, C

    def forward(self, x, *, train=True):
        return unpatchify(x, self.p, self.C)

    def backward(self, dy):
        return patchify(dy, self.p)


def randomize(module, rng, scale=0.3):
    """Add N(0, scale) noise to every parameter (new arrays; float64)."""
    for _, m, k in module.named_parameters():
        m.params[k] = m.params[k] + scale * rng.standard_normal(m.params[k].shape)
    return module


def _as_tuple(g):
    if g is None:
        return ()
    return g if isinstance(g, tuple) else (g,)


def _fd_grad(run, arr, idx, cot, h):
    """Central differences of sum(run() * cot) w.r.t. arr.flat[idx], perturbing arr in place.
    The outputs are subtracted before the contraction with cot, which keeps round-off small."""
    out = np.empty(len(idx))
    for n, i in enumerate(idx):
        old = arr.flat[i]
        arr.flat[i] = old + h
        up = run()
        arr.flat[i] = old - h
        down = run()
        arr.flat[i] = old
        out[n] = np.sum((up - down) * cot) / (2 * h)
    return out


def _autograd_grads(module, inputs, diff, cot):
    """autograd's gradients of sum(forward * cot): (input grads, parameter grads), in order."""
    slots = [(m, k) for _, m, k in module.named_parameters()]
    saved = [m.params[k] for m, k in slots]

    def loss(values):
        args = list(inputs)
        for i, v in zip(diff, values):
            args[i] = v
        try:
            for (m, k), v in zip(slots, values[len(diff):]):
                m.params[k] = v  # boxes go into the module for the trace
            return anp.sum(module(*args) * cot)
        finally:
            for (m, k), v in zip(slots, saved):
                m.params[k] = v

    g = autograd.grad(loss)([inputs[i] for i in diff] + saved)
    return g[:len(diff)], g[len(diff):]


def check_layer(name, make, inputs, diff=None, seed=0, max_entries=16, fd_tol=FD_TOL,
                ag_tol=AG_TOL, h=FD_STEP):
    """Check the hand backward of the layer `make(rng)` at `inputs` (a tuple of arrays).

    The layer's parameters are randomized first (see `randomize`). Finite differences are
    taken at up to `max_entries` entries of each tensor (all of a tensor that small).
    `diff`: the indices of the inputs whose gradient `backward` returns, in its order
    (default: every float input). Integer inputs such as labels are passed through.
    Returns one Row(layer, tensor, fd, ag, ok) per gradient tensor (inputs first, then every
    parameter by its dotted name); fd/ag are relative errors as defined in the module doc.
    """
    rng = np.random.default_rng(seed)
    module = randomize(make(rng), rng)
    inputs = tuple(None if a is None else np.array(a, dtype=np.float64) if np.issubdtype(np.asarray(a).dtype, np.floating)
                   else np.asarray(a) for a in inputs)      # None: an optional input left out
    if diff is None:
        diff = tuple(i for i, a in enumerate(inputs) if a is not None and a.dtype == np.float64)

    out = module(*inputs)
    cot = rng.standard_normal(out.shape)
    hand_in = _as_tuple(module.backward(cot))
    if len(hand_in) != len(diff):
        raise ValueError(f"{name}: backward returned {len(hand_in)} input gradients, expected {len(diff)}")
    names = [f"input{i}" if len(diff) > 1 else "input" for i in diff]
    tensors = [inputs[i] for i in diff]
    hand = [np.array(g) for g in hand_in]
    for pname, m, k in module.named_parameters():
        names.append(pname)
        tensors.append(m.params[k])
        hand.append(np.array(m.grads[k]))

    run = lambda: module(*inputs)
    fd_errs = []
    for arr, g in zip(tensors, hand):
        if g.shape != arr.shape:
            raise ValueError(f"{name}: gradient shape {g.shape} != tensor shape {arr.shape}")
        if arr.size <= max_entries:
            idx = np.arange(arr.size)
        else:
            idx = np.unique(np.append(rng.choice(arr.size, max_entries - 1, replace=False),
                                      np.argmax(np.abs(g))))
        fd_errs.append(rel_err(g.flat[idx], _fd_grad(run, arr, idx, cot, h)))

    if autograd is not None:
        ag_in, ag_par = _autograd_grads(module, inputs, diff, cot)
        ag_errs = [rel_err(g, r) for g, r in zip(hand, list(ag_in) + list(ag_par))]
    else:
        ag_errs = [None] * len(hand)

    return [Row(name, n, fd, ag, fd <= fd_tol and (ag is None or ag <= ag_tol))
            for n, fd, ag in zip(names, fd_errs, ag_errs)]


# ----------------------------------------------------------------------------------------
# Every layer, and the whole model
# ----------------------------------------------------------------------------------------

Case = namedtuple("Case", "name make inputs diff max_entries")   # check_layer's arguments


def layer_cases():
    """Every layer, and the whole model in each configuration, as Cases: the one table that
    `tinyuvit gradcheck` runs and the tests parametrize over. Small shapes, fixed seeds."""
    r = np.random.default_rng(1234)
    tok = lambda *s: r.standard_normal(s)
    D, H = 8, 2
    model = UViTConfig(img_size=8, patch_size=2, dim=16, depth=4, num_heads=2, num_classes=3)
    x8, t2, y2 = tok(2, 1, 8, 8), np.array([3.0, 417.0]), np.array([1, 3])  # 3 = the null label
    uvit = lambda name, seed=2, cap=16, **o: Case(f"UViT {name}", lambda g: UViT(replace(model, **o), seed=seed),
                                                  (tok(2, o.get("in_chans", 1), 8, 8) if "in_chans" in o else x8, t2, y2),
                                                  (0,), cap)
    return [
        Case("Linear", lambda g: Linear(5, 4, g), (tok(2, 3, 5),), None, 256),
        Case("Linear no bias", lambda g: Linear(5, 4, g, bias=False), (tok(7, 5),), None, 256),
        Case("LayerNorm", lambda g: LayerNorm(6), (tok(2, 3, 6),), None, 256),
        Case("LayerNorm no affine", lambda g: LayerNorm(6, affine=False), (tok(2, 3, 6),), None, 256),
        Case("GELU", lambda g: GELU(), (2.5 * tok(3, 7),), None, 256),
        Case("Softmax", lambda g: Softmax(), (2.0 * tok(2, 3, 5),), None, 256),
        Case("Attention", lambda g: Attention(D, H, g), (tok(2, 5, D),), None, 128),
        Case("Attention 1 head", lambda g: Attention(6, 1, g), (tok(1, 4, 6),), None, 128),
        Case("MLP", lambda g: MLP(D, 4 * D, g), (tok(2, 3, D),), None, 128),
        Case("PatchEmbed", lambda g: PatchEmbed(2, 3, D, g), (tok(2, 3, 4, 4),), None, 128),
        Case("Conv3x3 1->1", lambda g: Conv3x3(1, 1, g), (tok(2, 1, 5, 5),), None, 256),
        Case("Conv3x3 2->3", lambda g: Conv3x3(2, 3, g), (tok(2, 2, 4, 5),), None, 256),
        Case("LabelEmbedding", lambda g: LabelEmbedding(4, D, g), (np.array([0, 4, 2, 0]),), (), 256),
        Case("PosEmbed", lambda g: PosEmbed(5, D, g), (tok(2, 5, D),), None, 256),
        Case("unpatchify", lambda g: Unpatchify(2, 3), (tok(2, 4, 12),), None, 256),
        Case("Block in", lambda g: Block(D, H, 2, g), (tok(2, 4, D),), None, 64),
        Case("Block out concat", lambda g: Block(D, H, 2, g, skip="concat"), (tok(2, 4, D), tok(2, 4, D)), None, 64),
        Case("Block out add", lambda g: Block(D, H, 2, g, skip="add"), (tok(2, 4, D), tok(2, 4, D)), None, 64),
        uvit("depth 2", seed=1, cap=32, depth=2),
        uvit("depth 3, 2 channels", seed=1, depth=3, in_chans=2),
        uvit("depth 4"),
        uvit("no conv, no positions", depth=2, conv="none", pos_embed="none"),
        # the ablation study's layers, and its ten one-change variants of U-ViT
        Case("AdaLN", lambda g: AdaLN(D, g), (tok(2, 3, D), tok(2, D)), None, 128),
        Case("Conv3x3 stride 2", lambda g: Conv3x3(2, 3, g, stride=2), (tok(2, 2, 6, 4),), None, 256),
        Case("Conv3x3 stride 2, odd", lambda g: Conv3x3(1, 2, g, stride=2), (tok(2, 1, 5, 7),), None, 256),
        Case("ConvPatchEmbed p2", lambda g: ConvPatchEmbed(2, 3, D, g), (tok(2, 3, 4, 4),), None, 128),
        Case("ConvPatchEmbed p4", lambda g: ConvPatchEmbed(4, 1, D, g), (tok(2, 1, 8, 8),), None, 128),
        Case("SinCosPosEmbed", lambda g: SinCosPosEmbed(2, 2, D), (tok(2, 6, D),), None, 256),
        Case("Block add_linear", lambda g: Block(D, H, 2, g, skip="add_linear"), (tok(2, 4, D), tok(2, 4, D)), None, 64),
        Case("Block linear_add", lambda g: Block(D, H, 2, g, skip="linear_add"), (tok(2, 4, D), tok(2, 4, D)), None, 64),
        Case("Block in adaln", lambda g: Block(D, H, 2, g, adaln=True), (tok(2, 4, D), None, tok(2, D)), (0,), 64),
        Case("Block out adaln", lambda g: Block(D, H, 2, g, skip="concat", adaln=True),
             (tok(2, 4, D), tok(2, 4, D), tok(2, D)), (0, 1), 64),
    ] + [uvit(name, seed=3, **overrides) for name, choice, overrides in ablations() if choice]


def check_case(case):
    """check_layer on one Case of the table."""
    return check_layer(case.name, case.make, case.inputs, diff=case.diff, max_entries=case.max_entries)


def run_all(verbose=True):
    """Check every layer and the model. Returns (rows, ok): one Row per gradient tensor."""
    rows = []
    if verbose:
        print(f"{'layer':<24} {'tensors':>7}  {'max rel err (FD)':>16}  "
              f"{'max rel err (autograd)':>22}  pass/fail")
    for case in layer_cases():
        t0 = time.perf_counter()
        layer_rows = check_case(case)
        rows += layer_rows
        if verbose:
            _print_row(summarize(layer_rows)[0], time.perf_counter() - t0)
    ok = all(r.ok for r in rows)
    if verbose:
        bad = [r for r in rows if not r.ok]
        for r in bad:
            print(f"FAIL {r.layer}: {r.tensor}  fd {r.fd:.2e}  autograd {_fmt(r.ag)}")
        print(f"{len(rows)} gradient tensors, {len(rows) - len(bad)} pass "
              f"(thresholds: FD {FD_TOL:g}, autograd {AG_TOL:g}"
              f"{'' if autograd is not None else '; autograd not installed: skipped'})")
    return rows, ok


def summarize(rows):
    """One Row per layer: the worst error over its tensors; `tensor` says how many."""
    out = {}
    for r in rows:
        out.setdefault(r.layer, []).append(r)
    return [Row(layer, f"{len(rs)} tensors", max(r.fd for r in rs),
                None if any(r.ag is None for r in rs) else max(r.ag for r in rs),
                all(r.ok for r in rs)) for layer, rs in out.items()]


def _fmt(v):
    return "skipped" if v is None else f"{v:.2e}"


def _print_row(r, seconds):
    print(f"{r.layer:<24} {r.tensor.split()[0]:>7}  {r.fd:>16.2e}  {_fmt(r.ag):>22}  "
          f"{'pass' if r.ok else 'FAIL'}   ({seconds:.1f} s)")


def main(verbose=True):
    """For the `tinyuvit gradcheck` command: 0 when every gradient passes, else 1."""
    _, ok = run_all(verbose=verbose)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
