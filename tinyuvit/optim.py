"""AdamW, gradient clipping, learning-rate warmup and an EMA of the weights, by hand.

All parameters in one buffer. `FlatParams(model)` copies every parameter of a model into one
contiguous 1-D array, `flat.data`, and makes each `m.params[k]` a view into it; the layers read
their parameters as before and see every in-place update at once. Gradients are gathered with one
concatenate, `flat.grad(net)`, so that clipping, AdamW and the EMA each run their handful of
vectorised operations over the whole buffer instead of over each of the ~100 parameter arrays:

    flat = FlatParams(model)       # after model.to(backend), before DataParallel
    opt = AdamW(flat, lr=...)      # moments m, v: flat arrays too
    ema = EMA(flat, decay=...)     # shadow: a flat array; ema.shadow = {name: view into it}
    ...
    grads = flat.grad(net)         # [P] every gradient (a DataParallel: summed over replicas)
    gnorm = clip_grad_norm(grads, max_norm)
    opt.step(grads, lr)
    ema.update(flat, step)

On CuPy the buffer is one piece: each operation is one kernel launch for all parameters,
and in float32 the whole AdamW update and the EMA update are one fused kernel each (kernels.py). On
NumPy it is walked in pieces of 32K numbers (128 KiB of float32), whose temporaries stay in the
core's cache, as in `backend.elementwise`: each operation over the whole 6 MB buffer at once
would send its temporaries to main memory and back, twice as slow as array by array.

Each update is elementwise and does the same operations in the same order on every number as on
the separate arrays, so the results are bit-identical; only the clipping norm's sum runs in
another order. Names stay: `flat.params`, `opt.state()` and `ema.shadow` are {name: view}, as
checkpoints store them, and a checkpoint is loaded by writing into them in place (`[...] =`).

AdamW, EMA and clip_grad_norm also take a plain {name: array} dict; its pieces are its arrays.
"""
import math

import numpy as np

from . import kernels
from .backend import xp_of

PIECE = 1 << 15   # numbers per piece of a flat array on NumPy (fastest of 4K..128K, and whole)


# ----------------------------------------------------------------------------------------
# FlatParams: every parameter a view into one 1-D buffer
# ----------------------------------------------------------------------------------------

class FlatParams:
    """The parameters of `model` moved into one contiguous 1-D buffer `data`; `params` is
    {name: view}, and every `m.params[k]` of the model is rebound to its view.

    Flatten after `model.to(backend)` (which makes new arrays). A DataParallel may be passed:
    its replicas are rebound too (one built after flattening shares the views by itself)."""

    def __init__(self, model):
        named = list(model.named_parameters())                 # (name, module, key), model order
        arrays = [m.params[k] for _, m, k in named]
        dtypes = {a.dtype for a in arrays}
        if len(dtypes) != 1:
            raise ValueError(f"parameters of one dtype needed to flatten, got {sorted(map(str, dtypes))}")
        self.names = [name for name, _, _ in named]
        self.shapes = [tuple(a.shape) for a in arrays]
        sizes = [int(np.prod(s)) for s in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()   # param i: [offsets[i], offsets[i+1])
        self.data = flatten(arrays)                            # [P], a copy of every parameter
        self.pieces = pieces(self.data)                        # slices the updates run over
        self.params = self.views(self.data)
        self.grad_data = None                                  # [P], filled by grad()
        for name, m, k in named:
            m.params[k] = self.params[name]
        for replica in getattr(model, "replicas", [])[1:]:     # a DataParallel's other replicas
            replica.load_state_dict(self.params)

    @property
    def size(self):
        return self.offsets[-1]

    def views(self, buffer):
        """{name: the parameter's view into `buffer`}, for any flat array laid out like `data`."""
        return {name: buffer[a:b].reshape(shape)
                for name, shape, a, b in zip(self.names, self.shapes, self.offsets[:-1], self.offsets[1:])}

    def flatten(self, arrays):
        """{name: array} -> one flat array in this layout (one concatenate)."""
        return flatten([arrays[name] for name in self.names])

    def grad(self, net):
        """`net`'s gradients gathered into one flat array [P]: the model's, or a DataParallel's
        summed over its replicas (anything with a `flat_grad(out)` gives it directly).

        The array is this object's and the next call overwrites it (a new 6 MB array every step
        costs more on NumPy than filling it: the memory is fresh from the system each time)."""
        if self.grad_data is None:
            self.grad_data = xp_of(self.data).empty_like(self.data)
        if hasattr(net, "flat_grad"):
            return net.flat_grad(out=self.grad_data)
        grads = list(net.grad_dict().values())
        if sum(int(g.size) for g in grads) != self.size:
            raise ValueError(f"{sum(int(g.size) for g in grads)} gradient numbers for {self.size} "
                             "parameters: not the model these parameters were flattened from")
        return flatten(grads, out=self.grad_data)

    def mask(self, pick):
        """Where `pick(name, array)` holds: a boolean array [P] over the buffer, or plain True /
        False when it holds for every parameter / for none."""
        chosen = [bool(pick(name, p)) for name, p in self.params.items()]
        if all(chosen) or not any(chosen):
            return chosen[0]
        return xp_of(self.data).asarray(np.repeat(chosen, np.diff(self.offsets)))

    def shares(self, model):
        """Whether every parameter of `model` is still this buffer's view (not after `model.to`)."""
        return all(m.params[k] is self.params[name] for name, m, k in model.named_parameters())


def flatten(arrays, out=None):
    """Arrays -> one 1-D array (`out`, if given), each raveled in turn: one concatenate."""
    arrays = list(arrays)
    return xp_of(*arrays).concatenate([a.ravel() for a in arrays], out=out)


def pieces(flat):
    """The slices of a flat array that an update runs over, one at a time: pieces of PIECE
    numbers on NumPy (cache-sized), the whole array on CuPy (one kernel each)."""
    n = flat.size
    step = PIECE if type(flat) is np.ndarray else max(n, 1)
    return [slice(a, min(a + step, n)) for a in range(0, n, step)]


def _split(arrays, layout):
    """`arrays` cut as `layout` says: slices of one flat array (or of a FlatParams' `data`), or
    names of a {name: array} dict."""
    if layout and isinstance(layout[0], str):
        return [arrays[name] for name in layout]
    if isinstance(arrays, dict):
        raise TypeError("flattened parameters take one flat array (FlatParams.grad), not a dict")
    flat = arrays.data if isinstance(arrays, FlatParams) else arrays
    return [flat[s] for s in layout]


# ----------------------------------------------------------------------------------------
# AdamW
# ----------------------------------------------------------------------------------------

class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019), as torch.optim.AdamW:
        p <- p - lr * wd * p
        m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
        p <- p - lr * (m / (1 - b1^k)) / (sqrt(v / (1 - b2^k)) + eps)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decay=None):
        """`params`: a FlatParams (updated piece by piece of its buffer) or {name: array} (array
        by array). `decay(name, array) -> bool` picks the parameters that get weight decay
        (default: all, as U-ViT; the ViT classifier decays only its weight matrices)."""
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.k = 0  # steps taken
        if isinstance(params, FlatParams):
            self.layout = params.pieces
            m, v = (xp_of(params.data).zeros_like(params.data) for _ in range(2))
            self.m, self.v = params.views(m), params.views(v)  # {name: view}, for checkpoints
            mask = True if decay is None else params.mask(decay)
            self.decayed = [mask if isinstance(mask, bool) else mask[s] for s in self.layout]
        else:
            self.layout = list(params)
            self.m = m = {k: xp_of(p).zeros_like(p) for k, p in params.items()}
            self.v = v = {k: xp_of(p).zeros_like(p) for k, p in params.items()}
            self.decayed = [decay is None or bool(decay(k, p)) for k, p in params.items()]
        self._p, self._m, self._v = _split(params, self.layout), _split(m, self.layout), _split(v, self.layout)

    def step(self, grads, lr=None):
        """One update with `grads` laid out as the parameters: a flat array for a FlatParams,
        {name: array} for a dict."""
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        self.k += 1
        c1, c2 = 1.0 - b1 ** self.k, 1.0 - b2 ** self.k
        for p, g, m, v, decayed in zip(self._p, _split(grads, self.layout), self._m, self._v, self.decayed):
            if kernels.fits_in_place(p, g, m, v):  # fused: the update below in one kernel
                kernels.adamw_step(p, g, m, v, decayed if self.weight_decay else False,
                                   1.0 - lr * self.weight_decay, b1, b2, c2, lr / c1, self.eps)
                continue
            xp = xp_of(p)
            if self.weight_decay:
                _decay(p, decayed, 1.0 - lr * self.weight_decay)
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            denom = xp.sqrt(v * (1.0 / c2))
            denom += self.eps
            p -= (lr / c1) * m / denom

    def state(self):
        """Moments as {"m.name": array, "v.name": array} (views for a FlatParams), for checkpoints."""
        out = {f"m.{k}": a for k, a in self.m.items()}
        out.update({f"v.{k}": a for k, a in self.v.items()})
        return out

    def load_state(self, arrays, k):
        """Copy saved moments (as `state()` names them) into this optimizer's, in place."""
        for name in self.m:
            self.m[name][...] = arrays[f"m.{name}"]
            self.v[name][...] = arrays[f"v.{name}"]
        self.k = int(k)


def _decay(p, decayed, factor):
    """p *= factor where `decayed`: True (all of p), False (none) or a boolean array over p.

    With a mask the factor is 1 elsewhere (p * 1 == p exactly); the factor is cast to p's dtype
    first, as the plain `p *= factor` does, so both give the same bits."""
    if decayed is True:
        p *= factor
    elif decayed is not False:
        one, f = p.dtype.type(1.0), p.dtype.type(factor)
        p *= xp_of(p).where(decayed, f, one)


# ----------------------------------------------------------------------------------------
# Clipping and the learning-rate schedule
# ----------------------------------------------------------------------------------------

def clip_grad_norm(grads, max_norm, flat=None):
    """Scale all gradients together so their global L2 norm is at most max_norm; returns the norm.

    `grads`: one flat array, or {name: array}. For a flat array, pass its FlatParams as `flat`
    to add up the squares parameter by parameter on NumPy, in the order of the separate arrays:
    the norm is then the same to the last bit, so runs repeat those made before the flat buffer
    (a norm off in its last bit changes a clipped step by 1e-7, which training amplifies to
    percents within a hundred steps). On CuPy the flat sum is one reduction."""
    if isinstance(grads, dict):
        parts = list(grads.values())
    elif flat is not None and type(grads) is np.ndarray:
        parts = list(flat.views(grads).values())
    else:
        parts = _split(grads, pieces(grads))
    total = float(sum((g * g).sum() for g in parts)) ** 0.5  # one device->host sync
    if max_norm and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in parts:
            g *= scale
    return total


def lr_at(step, base_lr, warmup, total_steps=None, schedule="constant"):
    """Linear warmup over `warmup` steps, then constant (U-ViT) or cosine decay to 0."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "cosine" and total_steps:
        frac = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    return base_lr


# ----------------------------------------------------------------------------------------
# EMA of the weights
# ----------------------------------------------------------------------------------------

class EMA:
    """An exponential moving average of the weights: e <- d e + (1 - d) p after every step.

    With warmup, step k uses d_k = min(d, (1 + k) / (10 + k)), so that the average forgets the
    random initial weights quickly: with d = 0.999 alone, 37% of the average after 1,000 steps
    would still be the initialisation, which ruins the samples of a short run.

    `shadow` is {name: array}: for a FlatParams, views into one flat array `data`, so that
    `ema_model.load_state_dict(ema.shadow)` makes a model that always holds the average.
    """

    def __init__(self, params, decay=0.999, warmup=True):
        self.decay, self.warmup = decay, warmup
        if isinstance(params, FlatParams):
            self.layout, self.data = params.pieces, params.data.copy()
            self.shadow = params.views(self.data)
            self._e = _split(self.data, self.layout)
        else:
            self.layout, self.data = list(params), None
            self.shadow = {k: p.copy() for k, p in params.items()}
            self._e = _split(self.shadow, self.layout)

    def decay_at(self, step):
        return ema_decay_at(step, self.decay, self.warmup)

    def update(self, params, step):
        """Average in `params`, laid out as at construction (a FlatParams or its flat array, or
        {name: array})."""
        d = self.decay_at(step)
        for e, p in zip(self._e, _split(params, self.layout)):
            if kernels.fits_in_place(e, p):  # fused: one kernel
                kernels.ema_update(e, p, d)
                continue
            e *= d
            e += (1.0 - d) * p


def ema_decay_at(step, decay, warmup=True):
    """The EMA's decay at `step`: min(decay, (1 + step) / (10 + step)) with warmup, else decay."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay
