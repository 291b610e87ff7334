"""Layers of U-ViT, each with its forward and its hand-written backward side by side.

The file follows the data through the U-ViT figure: the building blocks (Linear, LayerNorm,
GELU, Softmax, Attention, MLP), then the patch embedding, the label and time tokens, the
positions, the transformer Block, and the decoder side (unpatchify, the 3x3 conv).

Conventions
- `forward(..., train=True)` returns the output. A training forward names what its backward
  needs in one place, `self.save(train, name=array, ...)`; the inference forward
  (`train=False`) keeps nothing, and a `backward` after it raises RuntimeError.
- `backward(dy)` takes dL/d(output) and returns dL/d(input); parameter gradients are
  written to `self.grads` under the same names as `self.params`.
- Every module is called once per forward pass, so `backward` overwrites its gradients.
- Parameters are drawn on the host in float64 from a NumPy Generator, so the same seed gives
  the same network on every backend; `Module.to(backend)` moves and casts them, and the model
  remembers its backend (`module.backend`, `.xp`, `.dtype`). A layer made of sublayers hands
  each its own generator (`sublayer_rng`): under a KeyedRng, which UViT uses, every layer
  draws from a generator keyed by the seed and its dotted name, so two models that share a
  layer (same name, same shape) start it from the same weights.
- Forward code runs on NumPy, CuPy, and autograd.numpy (the gradient checks trace it), so it
  avoids `out=`; in-place `+=`, `*=` on arrays it made itself are fine (autograd rebinds).
  Backward code is never traced and writes in place where that saves a copy.
- Shapes: B batch, L tokens, D width, H heads, hd = D / H head width, C channels.
- On a GPU in float32, LayerNorm, GELU and softmax run as one fused kernel each
  (tinyuvit/kernels.py, tested equal to the array code here, which is the reference and what
  NumPy runs); each place is marked `# fused:`.
"""
import functools
import math
import zlib

import numpy as np

from . import kernels
from .backend import Backend, elementwise, erf, sum_rows, to_numpy, xp_of


@functools.lru_cache(maxsize=None)
def _backend(device, dtype):
    return Backend(device, dtype)


# ========================================================================================
# Building blocks
# ========================================================================================

# ----------------------------------------------------------------------------------------
# Initial weights keyed by name: the same seed and layer name, the same start
# ----------------------------------------------------------------------------------------

class KeyedRng(np.random.Generator):
    """A NumPy Generator keyed by a seed and a layer's dotted name ('out_blocks.1.skip_linear'):
    the same seed and name always draw the same numbers, whatever other layers the model has."""

    def __init__(self, seed, name):
        super().__init__(np.random.PCG64([seed, zlib.crc32(name.encode())]))  # crc32: stable across runs
        self.seed, self.name = seed, name

    def child(self, name):
        """The generator of sublayer `name`, keyed by the joined name ('out_blocks.1' + 'attn')."""
        return KeyedRng(self.seed, f"{self.name}.{name}")


def sublayer_rng(rng, name):
    """What sublayer `name` draws its initial weights from: its own keyed generator under a
    KeyedRng (UViT), else `rng` itself, drawn in order (any other Generator: the ViT, tests)."""
    return rng.child(name) if isinstance(rng, KeyedRng) else rng

# ----------------------------------------------------------------------------------------
# Module: parameters, gradients, names, the backward cache, the backend
# ----------------------------------------------------------------------------------------

class Module:
    """Holds `params` and `grads` (dicts of arrays), the `cache` its backward reads, and any
    child modules as attributes."""

    def __init__(self):
        self.params, self.grads = {}, {}
        self.cache = None                   # what backward needs; set by a training forward
        self.placement = ("cpu", "float64")  # (device, dtype) of the parameters; see `to`

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # -- the cache between forward and backward ---------------------------------------------

    def save(self, train, **arrays):
        """Keep `arrays` for backward after a training forward; after an inference forward
        (train=False) keep nothing, and drop what an earlier training forward kept."""
        self.cache = arrays if train else None

    def saved(self, *names):
        """The arrays the last training forward saved, in the order named."""
        if self.cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward needs a training forward first: "
                               "the last forward was forward(..., train=False) (or there was none)")
        return [self.cache[n] for n in names] if len(names) != 1 else self.cache[names[0]]

    # -- children and parameters -------------------------------------------------------------

    def children(self):
        """(name, module) for child modules, lists of modules named 'name.i', in definition order."""
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    if isinstance(v, Module):
                        yield f"{name}.{i}", v

    def modules(self, prefix=""):
        """(dotted name, module) for this module and every descendant."""
        yield prefix, self
        for name, child in self.children():
            yield from child.modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self):
        """(flat name like 'blocks.3.attn.qkv.W', module, key) for every parameter."""
        for mname, m in self.modules():
            for key in m.params:
                yield (f"{mname}.{key}" if mname else key), m, key

    def state_dict(self):
        """Flat {name: array} view of every parameter (the arrays themselves, not copies)."""
        return {name: m.params[k] for name, m, k in self.named_parameters()}

    def grad_dict(self):
        return {name: m.grads[k] for name, m, k in self.named_parameters()}

    def load_state_dict(self, state):
        """Replace every parameter by `state[name]` (same shapes required; extra/missing names refused)."""
        names = [n for n, _, _ in self.named_parameters()]
        missing, extra = set(names) - set(state), set(state) - set(names)
        if missing or extra:
            raise ValueError(f"parameter names differ: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
        for name, m, k in self.named_parameters():
            if tuple(state[name].shape) != tuple(m.params[k].shape):
                raise ValueError(f"parameter {name}: expected shape {tuple(m.params[k].shape)}, "
                                 f"got {tuple(state[name].shape)}")
            m.params[k] = state[name]

    def num_params(self):
        return int(sum(int(np.prod(m.params[k].shape)) for _, m, k in self.named_parameters()))

    # -- the backend: recorded by `to`, the one place that says where the parameters live ----

    def to(self, backend):
        """Move and cast every parameter to `backend` (a tinyuvit.backend.Backend), and record it."""
        for _, m in self.modules():
            m.placement = (backend.device, backend.dtype_name)
            m.cache = None
            m.grads.clear()
            for k in m.params:
                m.params[k] = backend.asarray(to_numpy(m.params[k]))
        return self

    @property
    def backend(self):
        """The Backend the parameters live on: the last `to(backend)`, else NumPy float64 (the init)."""
        return _backend(*self.placement)

    @property
    def xp(self):
        """The parameters' array module: numpy or cupy."""
        return self.backend.xp

    @property
    def dtype(self):
        """The parameters' float dtype (float32 for training, float64 for gradient checks)."""
        return self.backend.dtype

    def replica(self):
        """A copy for another thread: the same parameter arrays (in-place updates reach both),
        its own gradients and cache."""
        new = object.__new__(type(self))
        for name, value in vars(self).items():
            if isinstance(value, Module):
                value = value.replica()
            elif isinstance(value, (list, tuple)) and any(isinstance(v, Module) for v in value):
                value = type(value)(v.replica() if isinstance(v, Module) else v for v in value)
            vars(new)[name] = value
        new.params, new.grads, new.cache = dict(self.params), {}, None
        return new


# ----------------------------------------------------------------------------------------
# Linear:  y = x W + b
# ----------------------------------------------------------------------------------------

class Linear(Module):
    """y = x @ W + b over the last axis. Init: W ~ N(0, 0.02), b = 0 (as U-ViT)."""

    def __init__(self, d_in, d_out, rng, bias=True):
        super().__init__()
        self.params["W"] = rng.normal(0.0, 0.02, (d_in, d_out))  # [d_in, d_out]
        if bias:
            self.params["b"] = np.zeros(d_out)

    def forward(self, x, *, train=True):  # [..., d_in] -> [..., d_out]
        W = self.params["W"]
        self.save(train, x=x)
        y = x.reshape(-1, W.shape[0]) @ W          # one 2-D matmul: [n, d_in] @ [d_in, d_out]
        if "b" in self.params:
            y += self.params["b"]
        return y.reshape(*x.shape[:-1], W.shape[1])

    # With rows X = x flattened to [n, d_in]:  Y = X W + b, so
    #   dW = X^T dY,  db = sum_rows dY,  dX = dY W^T.
    def backward(self, dy):  # [..., d_out] -> [..., d_in]
        x = self.saved("x")
        W = self.params["W"]
        x2 = x.reshape(-1, W.shape[0])             # [n, d_in]
        dy2 = dy.reshape(-1, W.shape[1])           # [n, d_out]
        self.grads["W"] = x2.T @ dy2
        if "b" in self.params:
            self.grads["b"] = sum_rows(dy2)
        return (dy2 @ W.T).reshape(x.shape)


# ----------------------------------------------------------------------------------------
# LayerNorm over the last axis, eps 1e-5, with a learned scale and shift
# ----------------------------------------------------------------------------------------

class LayerNorm(Module):
    """y = (x - mean) / sqrt(var + eps) * g + b over the last axis. Init g = 1, b = 0.
    `affine=False`: y = (x - mean) / sqrt(var + eps), no parameters (inside AdaLN)."""

    def __init__(self, dim, eps=1e-5, affine=True):
        super().__init__()
        self.eps = eps
        if affine:
            self.params["g"] = np.ones(dim)
            self.params["b"] = np.zeros(dim)

    def forward(self, x, *, train=True):  # [..., D] -> [..., D]
        if kernels.fits(x):  # fused: all of the below in one kernel
            y, xhat, rstd = kernels.layernorm_forward(x, self.params.get("g"), self.params.get("b"), self.eps, train)
            self.save(train, xhat=xhat, rstd=rstd)
            return y
        xhat = x - x.mean(axis=-1, keepdims=True)                # x - mu, a new array
        var = (xhat * xhat).mean(axis=-1, keepdims=True)         # [..., 1]
        rstd = 1.0 / xp_of(var).sqrt(var + self.eps)             # [..., 1]
        xhat *= rstd                                             # xhat = (x - mu) r, in place
        self.save(train, xhat=xhat, rstd=rstd)
        if "g" not in self.params:
            return xhat
        if train:
            y = xhat * self.params["g"]
        else:                                                    # xhat is not kept: reuse it
            y = xhat
            y *= self.params["g"]
        y += self.params["b"]
        return y

    # xhat = (x - mu) r with r = (var + eps)^-1/2. Writing h = dL/dxhat = dy * g, the chain rule
    # through mu (d mu/dx = 1/D) and var (d var/dx = 2 (x - mu)/D, d r/d var = -r^3/2) gives
    #   dx = r (h - mean(h) - xhat mean(h xhat))      (means over the last axis).
    def backward(self, dy):
        xhat, rstd = self.saved("xhat", "rstd")
        xp, D = xp_of(dy), dy.shape[-1]
        if "g" in self.params:
            self.grads["g"] = sum_rows((dy * xhat).reshape(-1, D))
            self.grads["b"] = sum_rows(dy.reshape(-1, D))
        if kernels.fits(dy, xhat):  # fused: dx below in one kernel
            return kernels.layernorm_backward(dy, xhat, rstd, self.params.get("g"))
        if "g" in self.params:
            h = dy * self.params["g"]
        else:
            h = dy.copy()                                        # written in place below
        t = h * xhat
        m = t.mean(axis=-1, keepdims=True)                       # mean(h xhat)  [..., 1]
        dx = h
        dx -= h.mean(axis=-1, keepdims=True)
        dx -= xp.multiply(xhat, m, out=t)                        # reuses t: xhat mean(h xhat)
        dx *= rstd
        return dx


# ----------------------------------------------------------------------------------------
# Adaptive LayerNorm (the paper's ablation of how time enters): AdaLN(h, e) = y_s LN(h) + y_b
# ----------------------------------------------------------------------------------------

class AdaLN(Module):
    """y = y_s * LN(x) + y_b, with [y_s, y_b] = e W + c linear in the time embedding e [B, D].

    LN has no parameters of its own; the bias c starts at [1, 0], so AdaLN starts as a plain
    LayerNorm and W ~ N(0, 0.02) lets the time move the scale and shift away from it.
    """

    def __init__(self, dim, rng):
        super().__init__()
        self.norm = LayerNorm(dim, affine=False)
        self.emb = Linear(dim, 2 * dim, sublayer_rng(rng, "emb"))   # e -> [y_s | y_b]
        self.emb.params["b"][:dim] = 1.0

    def forward(self, x, e, *, train=True):  # x [B, L, D], e [B, D] -> [B, L, D]
        D = x.shape[-1]
        ys_yb = self.emb(e, train=train)[:, None, :]             # [B, 1, 2D]
        ys, yb = ys_yb[..., :D], ys_yb[..., D:]                  # [B, 1, D] each
        xhat = self.norm(x, train=train)                         # [B, L, D]
        self.save(train, xhat=xhat, ys=ys)
        return xhat * ys + yb

    # y = y_s xhat + y_b, with y_s, y_b the same for every token of an image:
    #   d y_s = sum over tokens of dy xhat,  d y_b = sum over tokens of dy,  d xhat = dy y_s.
    # Returns (dx, de).
    def backward(self, dy):
        xhat, ys = self.saved("xhat", "ys")
        xp = xp_of(dy)
        dys_yb = xp.concatenate([(dy * xhat).sum(axis=1), dy.sum(axis=1)], axis=-1)  # [B, 2D]
        de = self.emb.backward(dys_yb)                           # [B, D]
        return self.norm.backward(dy * ys), de


# ----------------------------------------------------------------------------------------
# GELU, the exact erf form:  gelu(x) = x Phi(x),  Phi the standard normal CDF
# ----------------------------------------------------------------------------------------

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def normal_cdf(x):
    """Phi(x) = (1 + erf(x / sqrt 2)) / 2."""
    return 0.5 * (1.0 + erf(x * _INV_SQRT2))


def gelu(x):
    """gelu(x) = x Phi(x) (inference: no slope)."""
    return x * normal_cdf(x)


def gelu_and_slope(x):
    """gelu(x) = x Phi(x) and its derivative Phi(x) + x phi(x), phi(x) = exp(-x^2/2) / sqrt(2 pi)."""
    cdf = normal_cdf(x)                                   # Phi(x)
    pdf = xp_of(x).exp(-0.5 * x * x) * _INV_SQRT2PI       # phi(x)
    return x * cdf, cdf + x * pdf


class GELU(Module):
    """gelu(x) = x * 0.5 * (1 + erf(x / sqrt 2))."""

    # The slope is computed in the forward pass, while x is at hand (and in the CPU's cache:
    # `elementwise` works through big arrays piece by piece); backward is one product.
    def forward(self, x, *, train=True):
        if not train:
            self.save(False)
            return kernels.gelu(x) if kernels.fits(x) else elementwise(gelu, x)   # fused: one kernel
        y, slope = kernels.gelu(x, slope=True) if kernels.fits(x) else elementwise(gelu_and_slope, x)
        self.save(True, slope=slope)
        return y

    def backward(self, dy):
        return dy * self.saved("slope")


# ----------------------------------------------------------------------------------------
# Softmax over the last axis
# ----------------------------------------------------------------------------------------

def softmax(s):
    """exp(s - max) / sum exp(s - max) over the last axis (the max keeps exp from overflowing)."""
    if kernels.fits(s):  # fused: one kernel
        return kernels.softmax(s)
    e = xp_of(s).exp(s - s.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    return e


def softmax_backward(p, dp):
    """dL/ds for p = softmax(s), given dp = dL/dp: the Jacobian dp_i/ds_j = p_i (delta_ij - p_j),
    row by row, gives  ds = p * (dp - sum_j dp_j p_j)."""
    if kernels.fits(p, dp):  # fused: one kernel
        return kernels.softmax_backward(p, dp)
    ds = dp * p
    r = ds.sum(axis=-1, keepdims=True)                  # [..., 1]
    xp_of(ds).subtract(dp, r, out=ds)                   # reuses ds: dp - r
    ds *= p
    return ds


class Softmax(Module):
    """p = softmax(s) over the last axis; backward needs only p."""

    def forward(self, s, *, train=True):
        p = softmax(s)
        self.save(train, p=p)
        return p

    def backward(self, dp):
        return softmax_backward(self.saved("p"), dp)


# ----------------------------------------------------------------------------------------
# Multi-head self-attention (no mask): qkv projection without bias, heads concatenated,
# then an output projection with bias
# ----------------------------------------------------------------------------------------

class Attention(Module):
    """softmax(q k^T / sqrt(hd)) v per head; qkv = x W_qkv (no bias); out = proj(concat heads)."""

    def __init__(self, dim, num_heads, rng):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5  # a Python float: keeps float32 arrays float32
        self.qkv = Linear(dim, 3 * dim, sublayer_rng(rng, "qkv"), bias=False)
        self.softmax = Softmax()
        self.proj = Linear(dim, dim, sublayer_rng(rng, "proj"))

    # The heads join the batch: qkv's columns are [q | k | v], each [head 0 | head 1 ...], so
    # [B, L, 3D] reads as [B, L, 3, H, hd]; one copy lays it out as [3, B*H, L, hd], and every
    # matmul below is one batched product over B*H contiguous matrices. (Strided per-head views
    # cost nothing on NumPy, but CuPy copied them before every product: a `tiny` training step
    # on an H200 went from 126 copies to 84, and from 0.83x to 1.10x PyTorch's speed.) The scale
    # 1/sqrt(hd) multiplies q, [L, hd] numbers per head, rather than the [L, L] scores.
    def forward(self, x, *, train=True):  # [B, L, D] -> [B, L, D]
        B, L, D = x.shape
        H, hd = self.num_heads, self.head_dim
        qkv = self.qkv(x, train=train)                               # [B, L, 3D]
        qkv = qkv.reshape(B, L, 3, H, hd).transpose((2, 0, 3, 1, 4)).reshape(3, B * H, L, hd)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]                # [B*H, L, hd] each, q scaled
        s = q @ k.transpose((0, 2, 1))                               # [B*H, L, L]
        A = self.softmax(s, train=train)                             # [B*H, L, L]
        o = A @ v                                                    # [B*H, L, hd]
        self.save(train, q=q, k=k, v=v)
        o = o.reshape(B, H, L, hd).transpose((0, 2, 1, 3)).reshape(B, L, D)   # heads concatenated
        return self.proj(o, train=train)

    # o = A v with A = softmax(S), S = q' k^T and q' = q s (the scaled q, saved):
    #   dA = do v^T,  dv = A^T do,
    #   dS = softmax_backward(A, dA),
    #   dq = (dS k) s,  dk = dS^T q'.
    # dq, dk, dv fill one [3, B*H, L, hd] array, laid back out as qkv's [B, L, 3D] in one copy.
    def backward(self, dy):  # [B, L, D] -> [B, L, D]
        q, k, v = self.saved("q", "k", "v")
        B, L, D = dy.shape
        H, hd = self.num_heads, self.head_dim
        xp = xp_of(dy)
        do = self.proj.backward(dy).reshape(B, L, H, hd).transpose(0, 2, 1, 3).reshape(B * H, L, hd)
        dqkv = xp.empty((3, B * H, L, hd), dtype=dy.dtype)
        dq, dk, dv = dqkv[0], dqkv[1], dqkv[2]                       # [B*H, L, hd] each
        A = self.softmax.saved("p")
        xp.matmul(A.transpose(0, 2, 1), do, out=dv)                  # dv = A^T do
        dS = self.softmax.backward(do @ v.transpose(0, 2, 1))        # [B*H, L, L]
        xp.matmul(dS, k, out=dq)
        dq *= self.scale                                             # dq = (dS k) s
        xp.matmul(dS.transpose(0, 2, 1), q, out=dk)                  # dk = dS^T q'
        dqkv = dqkv.reshape(3, B, H, L, hd).transpose(1, 3, 0, 2, 4).reshape(B, L, 3 * D)
        return self.qkv.backward(dqkv)


# ----------------------------------------------------------------------------------------
# MLP: Linear(D -> rD), GELU, Linear(rD -> D)
# ----------------------------------------------------------------------------------------

class MLP(Module):
    def __init__(self, dim, hidden, rng):
        super().__init__()
        self.fc1 = Linear(dim, hidden, sublayer_rng(rng, "fc1"))
        self.act = GELU()
        self.fc2 = Linear(hidden, dim, sublayer_rng(rng, "fc2"))

    def forward(self, x, *, train=True):  # [B, L, D] -> [B, L, rD] -> [B, L, D]
        return self.fc2(self.act(self.fc1(x, train=train), train=train), train=train)

    def backward(self, dy):
        return self.fc1.backward(self.act.backward(self.fc2.backward(dy)))


# ========================================================================================
# Input side: patches, the label token, the time token, positions
# ========================================================================================

# ----------------------------------------------------------------------------------------
# Patches: an image [B, C, H, W] -> tokens [B, N, p*p*C] (channels vary fastest in a patch)
# ----------------------------------------------------------------------------------------

def patchify(x, p):  # [B, C, H, W] -> [B, (H/p)(W/p), p*p*C]
    B, C, H, W = x.shape
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p).transpose((0, 2, 4, 3, 5, 1))  # [B, h, w, p, p, C]
    return x.reshape(B, h * w, p * p * C)


class PatchEmbed(Module):
    """A linear map of each flattened p x p patch to D (a conv with kernel = stride = p)."""

    def __init__(self, patch_size, in_chans, dim, rng):
        super().__init__()
        self.p, self.in_chans = patch_size, in_chans
        self.proj = Linear(patch_size * patch_size * in_chans, dim, sublayer_rng(rng, "proj"))

    def forward(self, x, *, train=True):  # [B, C, H, W] -> [B, N, D]
        return self.proj(patchify(x, self.p), train=train)

    def backward(self, dy):  # [B, N, D] -> [B, C, H, W]
        return unpatchify(self.proj.backward(dy), self.p, self.in_chans)


def image_to_tokens(x):  # [B, C, h, w] -> [B, h*w, C]   (one token per pixel, row by row)
    B, C, h, w = x.shape
    return x.reshape(B, C, h * w).transpose((0, 2, 1))


def tokens_to_image(x, h, w):  # [B, h*w, C] -> [B, C, h, w]   (the inverse)
    B, N, C = x.shape
    return x.transpose((0, 2, 1)).reshape(B, C, h, w)


class ConvPatchEmbed(Module):
    """The conv-stem ablation: log2(p) strided 3x3 convs, each halving the image (GELU after
    each), then a 1x1 conv (a Linear on each pixel's channels) to D: the same token grid as
    the linear patch embedding. Widths for p = 4: C -> D/4 -> D/2 -> D."""

    def __init__(self, patch_size, in_chans, dim, rng):
        super().__init__()
        k = int(round(math.log2(patch_size)))
        if patch_size < 2 or 2 ** k != patch_size:
            raise ValueError(f"a conv patch embedding needs a patch size that is a power of 2, got {patch_size}")
        widths = [in_chans] + [dim // 2 ** (k - i) for i in range(k)]
        self.convs = [Conv3x3(a, b, sublayer_rng(rng, f"convs.{i}"), stride=2)
                      for i, (a, b) in enumerate(zip(widths, widths[1:]))]
        self.acts = [GELU() for _ in self.convs]
        self.proj = Linear(widths[-1], dim, sublayer_rng(rng, "proj"))   # the 1x1 conv

    def forward(self, x, *, train=True):  # [B, C, H, W] -> [B, N, D]
        for conv, act in zip(self.convs, self.acts):
            x = act(conv(x, train=train), train=train)           # [B, c, H/2, W/2] each time
        self.save(train, grid=x.shape[2:])
        return self.proj(image_to_tokens(x), train=train)        # [B, h*w, D]

    def backward(self, dy):  # [B, N, D] -> [B, C, H, W]
        h, w = self.saved("grid")
        dx = tokens_to_image(self.proj.backward(dy), h, w)
        for conv, act in zip(reversed(self.convs), reversed(self.acts)):
            dx = conv.backward(act.backward(dx))
        return dx


# ----------------------------------------------------------------------------------------
# The label token: a table with one extra row, the null label
# ----------------------------------------------------------------------------------------

class LabelEmbedding(Module):
    """A table of num_classes + 1 rows; the last row is the null label for classifier-free guidance.

    Init N(0, 1), PyTorch's default for an embedding table (U-ViT keeps it).
    """

    def __init__(self, num_classes, dim, rng):
        super().__init__()
        self.num_classes = num_classes  # valid labels: 0 .. num_classes (the last is "null")
        self.params["W"] = rng.normal(0.0, 1.0, (num_classes + 1, dim))

    def forward(self, y, *, train=True):  # [B] ints -> [B, D]
        self.save(train, y=y)
        return self.params["W"][y]

    # Row y[b] of W was copied to output b, so dW[r] = sum of dy[b] over the b with y[b] = r:
    # dW = onehot(y)^T dy (a matmul, the same on every backend).
    def backward(self, dy):
        y = self.saved("y")
        xp = xp_of(dy)
        W = self.params["W"]
        onehot = (y[:, None] == xp.arange(W.shape[0])[None, :]).astype(dy.dtype)  # [B, K+1]
        self.grads["W"] = onehot.T @ dy
        return None  # labels are integers: no gradient flows to them


# ----------------------------------------------------------------------------------------
# The time token: a sinusoidal embedding, no parameters
# ----------------------------------------------------------------------------------------

def timestep_embedding(t, dim, dtype):
    """Sinusoidal embedding of timesteps [B] -> [B, dim]: [cos(t f), sin(t f)], cos half first,
    f_i = exp(-ln(10000) i / half) for i < half = dim // 2 (a zero column pads an odd dim)."""
    xp = xp_of(t)
    half = dim // 2
    freqs = xp.exp(-math.log(10000.0) * xp.arange(half, dtype=np.float64) / half)  # [half]
    args = xp.asarray(t, dtype=np.float64)[:, None] * freqs[None, :]               # [B, half]
    emb = xp.concatenate([xp.cos(args), xp.sin(args)], axis=-1)
    if dim % 2:
        emb = xp.concatenate([emb, xp.zeros_like(emb[:, :1])], axis=-1)
    return emb.astype(dtype)                                                        # [B, dim]


# ----------------------------------------------------------------------------------------
# Positions: a learned 1-D embedding, added after [label, time, patches] are concatenated
# ----------------------------------------------------------------------------------------

class PosEmbed(Module):
    """A learned 1-D positional embedding [1, L, D], added to every sequence. Init N(0, 0.02)."""

    def __init__(self, length, dim, rng):
        super().__init__()
        self.params["pos"] = rng.normal(0.0, 0.02, (1, length, dim))

    def forward(self, x, *, train=True):  # [B, L, D] -> [B, L, D]
        return x + self.params["pos"]      # nothing to save: the gradient is dy itself

    def backward(self, dy):
        self.grads["pos"] = sum_rows(dy.reshape(dy.shape[0], -1)).reshape(self.params["pos"].shape)
        return dy


def sincos_2d(grid, dim):
    """Fixed 2-D sinusoidal positions of a grid x grid of tokens, row-major: [grid*grid, dim].
    The first half of the dims encodes the row, the second the column, each as
    [sin(pos w_i), cos(pos w_i)] with w_i = 10000^(-i / (dim/4)), i < dim/4 (dim divisible by 4)."""
    if dim % 4:
        raise ValueError(f"2-D sinusoidal positions need a width divisible by 4, got {dim}")
    w = 10000.0 ** (-np.arange(dim // 4) / (dim // 4))                  # [dim/4]
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    enc = lambda pos: np.concatenate([np.sin(pos.reshape(-1, 1) * w), np.cos(pos.reshape(-1, 1) * w)], axis=1)
    return np.concatenate([enc(rows), enc(cols)], axis=1)               # [grid^2, dim]


@functools.lru_cache(maxsize=8)
def _sincos_table(extras, grid, dim, dtype, xp):
    """[1, extras + grid^2, dim] on array module xp: zeros for the extras, then sincos_2d."""
    table = np.concatenate([np.zeros((extras, dim)), sincos_2d(grid, dim)])[None]
    return xp.asarray(table, dtype=dtype)


class SinCosPosEmbed(Module):
    """Fixed 2-D sinusoidal positions (the ablation of learned 1-D ones), added to the patch
    tokens; the `extras` tokens before them (label, time) get none. No parameters."""

    def __init__(self, extras, grid, dim):
        super().__init__()
        self.extras, self.grid, self.dim = extras, grid, dim

    def forward(self, x, *, train=True):  # [B, L, D] -> [B, L, D]
        return x + _sincos_table(self.extras, self.grid, self.dim, np.dtype(x.dtype), xp_of(x))

    def backward(self, dy):
        return dy


# ========================================================================================
# The transformer block, pre-norm, with U-ViT's optional long-skip input
# ========================================================================================

class Block(Module):
    """The long skip (out-blocks only), then x <- x + attn(LN(x)); x <- x + mlp(LN(x)).

    `skip` picks the long-skip form of an out-block, with h_m = x the main branch and h_s = skip:
    "concat" (U-ViT): Linear(concat(h_m, h_s)); "add": h_m + h_s; "add_linear": h_m + Linear(h_s);
    "linear_add": Linear(h_m + h_s); None (in-blocks, the mid-block, out-blocks without long
    skips: the `skip` input is then ignored). `adaln=True` replaces both LayerNorms by AdaLN of
    the time embedding `e` (the time-as-AdaLN ablation; no time token then).
    """

    SKIPS = (None, "concat", "add", "add_linear", "linear_add")

    def __init__(self, dim, num_heads, mlp_ratio, rng, skip=None, adaln=False):
        super().__init__()
        if skip not in self.SKIPS:
            raise ValueError(f"skip must be one of {self.SKIPS}, got {skip!r}")
        self.skip, self.adaln = skip, adaln
        skip_in = {"concat": 2 * dim, "add_linear": dim, "linear_add": dim}.get(skip)
        sub = lambda name: sublayer_rng(rng, name)
        self.skip_linear = Linear(skip_in, dim, sub("skip_linear")) if skip_in else None
        self.norm1 = AdaLN(dim, sub("norm1")) if adaln else LayerNorm(dim)
        self.attn = Attention(dim, num_heads, sub("attn"))
        self.norm2 = AdaLN(dim, sub("norm2")) if adaln else LayerNorm(dim)
        self.mlp = MLP(dim, dim * mlp_ratio, sub("mlp"))

    def forward(self, x, skip=None, e=None, *, train=True):  # [B, L, D] (+ skip [B, L, D], e [B, D]) -> [B, L, D]
        if self.skip == "concat":        # U-ViT's choice: Linear(concat(x, skip)) replaces x
            x = self.skip_linear(xp_of(x, skip).concatenate([x, skip], axis=-1), train=train)  # [B, L, 2D] -> [B, L, D]
        elif self.skip == "add":         # the paper's weakest: x + skip
            x = x + skip
        elif self.skip == "add_linear":  # x + Linear(skip)
            x = x + self.skip_linear(skip, train=train)
        elif self.skip == "linear_add":  # Linear(x + skip)
            x = self.skip_linear(x + skip, train=train)
        norm = (lambda n, h: n(h, e, train=train)) if self.adaln else (lambda n, h: n(h, train=train))
        x = x + self.attn(norm(self.norm1, x), train=train)
        x = x + self.mlp(norm(self.norm2, x), train=train)
        return x

    # Each residual x + f(LN(x)) passes dy straight through and adds f's path back in.
    # Returns dx, or (dx, dskip) for an out-block with a long skip. (With AdaLN the gradient
    # reaching the time embedding is dropped: the sinusoid has no parameters.)
    def backward(self, dy):
        dnorm = (lambda n, d: n.backward(d)[0]) if self.adaln else (lambda n, d: n.backward(d))
        dy = dy + dnorm(self.norm2, self.mlp.backward(dy))
        dy = dy + dnorm(self.norm1, self.attn.backward(dy))
        if self.skip is None:
            return dy
        if self.skip == "add":
            return dy, dy
        if self.skip == "add_linear":
            return dy, self.skip_linear.backward(dy)
        if self.skip == "linear_add":
            d = self.skip_linear.backward(dy)
            return d, d
        dcat = self.skip_linear.backward(dy)                   # [B, L, 2D]
        D = dcat.shape[-1] // 2
        return dcat[..., :D], dcat[..., D:]


# ========================================================================================
# Output side: tokens back to an image, then the 3x3 conv
# ========================================================================================

def unpatchify(x, p, C):  # [B, N, p*p*C] -> [B, C, H, W]   (the inverse of patchify)
    B, N, _ = x.shape
    h = w = int(round(math.sqrt(N)))
    x = x.reshape(B, h, w, p, p, C).transpose((0, 5, 1, 3, 2, 4))  # [B, C, h, p, w, p]
    return x.reshape(B, C, h * p, w * p)


class Conv3x3(Module):
    """out[b, o, y, x] = sum_{c,i,j} W[o, c, i, j] xpad[b, c, s y + i, s x + j] + bias[o]
    (cross-correlation, padding 1, stride s; s = 1 keeps the size, s = 2 halves an even one).

    Init as PyTorch's default for conv layers: W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """

    def __init__(self, c_in, c_out, rng, stride=1):
        super().__init__()
        self.stride = stride
        bound = 1.0 / math.sqrt(c_in * 9)
        self.params["W"] = rng.uniform(-bound, bound, (c_out, c_in, 3, 3))
        self.params["b"] = rng.uniform(-bound, bound, (c_out,))

    def _taps(self, H, W):
        """The 9 windows of the padded input, as slices: output pixel (y, x) reads xpad at
        (s y + i, s x + j) for tap (i, j)."""
        s = self.stride
        Ho, Wo = (H - 1) // s + 1, (W - 1) // s + 1
        return Ho, Wo, [(slice(i, i + s * (Ho - 1) + 1, s), slice(j, j + s * (Wo - 1) + 1, s))
                        for i in range(3) for j in range(3)]

    def forward(self, x, *, train=True):  # [B, C, H, W] -> [B, C_out, H/s, W/s]
        xp = xp_of(x, self.params["W"])
        B, C, H, W = x.shape
        Ho, Wo, taps = self._taps(H, W)
        xpad = xp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="constant")  # [B, C, H+2, W+2]
        # im2col: the 9 shifted views, stacked: [B, C, 9, Ho, Wo] -> [B, C*9, Ho*Wo]
        cols = xp.stack([xpad[:, :, r, c] for r, c in taps], axis=2)
        cols = cols.reshape(B, C * 9, Ho * Wo)
        self.save(train, cols=cols, shape=(H, W))
        Wm = self.params["W"].reshape(self.params["W"].shape[0], C * 9)  # [C_out, C*9]
        out = Wm @ cols + self.params["b"][:, None]                # [B, C_out, Ho*Wo]
        return out.reshape(B, -1, Ho, Wo)

    # out = Wm cols + b is a Linear on the columns: dWm = sum_b dout cols^T, db = sum dout,
    # dcols = Wm^T dout; each column entry is a shifted copy of x, so dx adds the 9 taps back.
    def backward(self, dy):  # [B, C_out, Ho, Wo] -> [B, C, H, W]
        cols, (H, W) = self.saved("cols", "shape")
        xp = xp_of(dy)
        Wfull = self.params["W"]
        B, _, Ho, Wo = dy.shape
        C = Wfull.shape[1]
        dy2 = dy.reshape(B, Wfull.shape[0], Ho * Wo)               # [B, C_out, Ho*Wo]
        self.grads["W"] = (dy2 @ cols.transpose(0, 2, 1)).sum(axis=0).reshape(Wfull.shape)
        self.grads["b"] = dy2.sum(axis=(0, 2))
        dcols = (Wfull.reshape(Wfull.shape[0], C * 9).T @ dy2).reshape(B, C, 9, Ho, Wo)
        dxpad = xp.zeros((B, C, H + 2, W + 2), dtype=dy.dtype)
        for n, (r, c) in enumerate(self._taps(H, W)[2]):
            dxpad[:, :, r, c] += dcols[:, :, n]
        return dxpad[:, :, 1:-1, 1:-1]
