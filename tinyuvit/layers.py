"""Layers of U-ViT, each with its forward and its hand-written backward side by side.

Conventions
- `forward(...)` keeps what the backward needs on `self` and returns the output.
- `backward(dy)` takes dL/d(output) and returns dL/d(input); parameter gradients are
  written to `self.grads` under the same names as `self.params`.
- Every module is called once per forward pass, so `backward` overwrites its gradients.
- Parameters are drawn on the host in float64 from a NumPy Generator, so the same seed gives
  the same network on every backend; `Module.to(backend)` moves and casts them.
- Shapes: B batch, L tokens, D width, H heads, hd = D / H head width, C channels.
"""
import math

import numpy as np

from .backend import elementwise, erf, to_numpy, xp_of


# ----------------------------------------------------------------------------------------
# Module: parameters, gradients, names
# ----------------------------------------------------------------------------------------

class Module:
    """Holds `params` and `grads` (dicts of arrays) and any child modules as attributes."""

    def __init__(self):
        self.params, self.grads = {}, {}

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

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

    def to(self, backend):
        """Move and cast every parameter to `backend` (a tinyuvit.backend.Backend)."""
        for _, m, k in self.named_parameters():
            m.params[k] = backend.asarray(to_numpy(m.params[k]))
            m.grads.pop(k, None)
        self._backend = backend
        return self


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

    def forward(self, x):  # [..., d_in] -> [..., d_out]
        W = self.params["W"]
        self.x = x
        y = x.reshape(-1, W.shape[0]) @ W          # one 2-D matmul: [n, d_in] @ [d_in, d_out]
        if "b" in self.params:
            y += self.params["b"]
        return y.reshape(*x.shape[:-1], W.shape[1])

    # With rows X = x flattened to [n, d_in]:  Y = X W + b, so
    #   dW = X^T dY,  db = sum_rows dY,  dX = dY W^T.
    def backward(self, dy):  # [..., d_out] -> [..., d_in]
        W = self.params["W"]
        x2 = self.x.reshape(-1, W.shape[0])
        dy2 = dy.reshape(-1, W.shape[1])
        self.grads["W"] = x2.T @ dy2
        if "b" in self.params:
            self.grads["b"] = dy2.sum(axis=0)
        return (dy2 @ W.T).reshape(self.x.shape)


# ----------------------------------------------------------------------------------------
# LayerNorm over the last axis, eps 1e-5, with a learned scale and shift
# ----------------------------------------------------------------------------------------

class LayerNorm(Module):
    """y = (x - mean) / sqrt(var + eps) * g + b over the last axis. Init g = 1, b = 0."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.params["g"] = np.ones(dim)
        self.params["b"] = np.zeros(dim)

    def forward(self, x):  # [..., D] -> [..., D]
        mu = x.mean(axis=-1, keepdims=True)
        xc = x - mu
        var = (xc * xc).mean(axis=-1, keepdims=True)
        self.rstd = 1.0 / xp_of(var).sqrt(var + self.eps)   # [..., 1]
        self.xhat = xc * self.rstd                           # [..., D]
        return self.xhat * self.params["g"] + self.params["b"]

    # xhat = (x - mu) r with r = (var + eps)^-1/2. Writing h = dL/dxhat = dy * g, the chain rule
    # through mu (d mu/dx = 1/D) and var (d var/dx = 2 (x - mu)/D, d r/d var = -r^3/2) gives
    #   dx = r (h - mean(h) - xhat mean(h xhat))      (means over the last axis).
    def backward(self, dy):
        D = dy.shape[-1]
        self.grads["g"] = (dy * self.xhat).reshape(-1, D).sum(axis=0)
        self.grads["b"] = dy.reshape(-1, D).sum(axis=0)
        h = dy * self.params["g"]
        return self.rstd * (h - h.mean(axis=-1, keepdims=True)
                            - self.xhat * (h * self.xhat).mean(axis=-1, keepdims=True))


# ----------------------------------------------------------------------------------------
# GELU, the exact erf form:  gelu(x) = x Phi(x),  Phi the standard normal CDF
# ----------------------------------------------------------------------------------------

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu_and_slope(x):
    """gelu(x) = x Phi(x) and its derivative Phi(x) + x phi(x), phi(x) = exp(-x^2/2) / sqrt(2 pi)."""
    cdf = 0.5 * (1.0 + erf(x * _INV_SQRT2))               # Phi(x)
    pdf = xp_of(x).exp(-0.5 * x * x) * _INV_SQRT2PI       # phi(x)
    return x * cdf, cdf + x * pdf


class GELU(Module):
    """gelu(x) = x * 0.5 * (1 + erf(x / sqrt 2))."""

    # The slope is computed in the forward pass, while x is at hand (and in the CPU's cache:
    # `elementwise` works through big arrays piece by piece); backward is one product.
    def forward(self, x):
        y, self.slope = elementwise(gelu_and_slope, x)
        return y

    def backward(self, dy):
        return dy * self.slope


# ----------------------------------------------------------------------------------------
# Multi-head self-attention (no mask): qkv projection without bias, heads concatenated,
# then an output projection with bias
# ----------------------------------------------------------------------------------------

def softmax(s, axis=-1):
    xp = xp_of(s)
    e = xp.exp(s - s.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


class Attention(Module):
    """softmax(q k^T / sqrt(hd)) v per head; qkv = x W_qkv (no bias); out = proj(concat heads)."""

    def __init__(self, dim, num_heads, rng):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5  # a Python float: keeps float32 arrays float32
        self.qkv = Linear(dim, 3 * dim, rng, bias=False)
        self.proj = Linear(dim, dim, rng)

    def forward(self, x):  # [B, L, D] -> [B, L, D]
        B, L, D = x.shape
        H, hd = self.num_heads, self.head_dim
        qkv = self.qkv(x)                                            # [B, L, 3D]
        qkv = qkv.reshape(B, L, 3, H, hd).transpose((2, 0, 3, 1, 4))  # [3, B, H, L, hd]
        q, k, v = qkv[0], qkv[1], qkv[2]                             # [B, H, L, hd] each
        self.attn = softmax((q @ k.transpose((0, 1, 3, 2))) * self.scale)  # [B, H, L, L]
        o = self.attn @ v                                            # [B, H, L, hd]
        self.q, self.k, self.v = q, k, v
        o = o.transpose((0, 2, 1, 3)).reshape(B, L, D)               # heads concatenated
        return self.proj(o)

    # o = A v with A = softmax(S), S = q k^T s:
    #   dA = do v^T,  dv = A^T do,
    #   dS = A * (dA - rowsum(dA * A))              (softmax Jacobian, row by row),
    #   dq = s dS k,  dk = s dS^T q.
    def backward(self, dy):  # [B, L, D] -> [B, L, D]
        B, L, D = dy.shape
        H, hd = self.num_heads, self.head_dim
        A, q, k, v = self.attn, self.q, self.k, self.v
        do = self.proj.backward(dy).reshape(B, L, H, hd).transpose(0, 2, 1, 3)  # [B, H, L, hd]
        dA = do @ v.transpose(0, 1, 3, 2)                            # [B, H, L, L]
        dv = A.transpose(0, 1, 3, 2) @ do                            # [B, H, L, hd]
        dS = A * (dA - (dA * A).sum(axis=-1, keepdims=True)) * self.scale
        dq = dS @ k                                                  # [B, H, L, hd]
        dk = dS.transpose(0, 1, 3, 2) @ q                            # [B, H, L, hd]
        dqkv = xp_of(dq).stack([dq, dk, dv])                         # [3, B, H, L, hd]
        dqkv = dqkv.transpose(1, 3, 0, 2, 4).reshape(B, L, 3 * D)    # [B, L, 3D]
        return self.qkv.backward(dqkv)


# ----------------------------------------------------------------------------------------
# MLP: Linear(D -> rD), GELU, Linear(rD -> D)
# ----------------------------------------------------------------------------------------

class MLP(Module):
    def __init__(self, dim, hidden, rng):
        super().__init__()
        self.fc1 = Linear(dim, hidden, rng)
        self.act = GELU()
        self.fc2 = Linear(hidden, dim, rng)

    def forward(self, x):  # [B, L, D] -> [B, L, rD] -> [B, L, D]
        return self.fc2(self.act(self.fc1(x)))

    def backward(self, dy):
        return self.fc1.backward(self.act.backward(self.fc2.backward(dy)))


# ----------------------------------------------------------------------------------------
# Patches: an image [B, C, H, W] <-> tokens [B, N, p*p*C] (channels vary fastest in a patch)
# ----------------------------------------------------------------------------------------

def patchify(x, p):  # [B, C, H, W] -> [B, (H/p)(W/p), p*p*C]
    B, C, H, W = x.shape
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p).transpose((0, 2, 4, 3, 5, 1))  # [B, h, w, p, p, C]
    return x.reshape(B, h * w, p * p * C)


def unpatchify(x, p, C):  # [B, N, p*p*C] -> [B, C, H, W]   (the inverse of patchify)
    B, N, _ = x.shape
    h = w = int(round(math.sqrt(N)))
    x = x.reshape(B, h, w, p, p, C).transpose((0, 5, 1, 3, 2, 4))  # [B, C, h, p, w, p]
    return x.reshape(B, C, h * p, w * p)


class PatchEmbed(Module):
    """A linear map of each flattened p x p patch to D (a conv with kernel = stride = p)."""

    def __init__(self, patch_size, in_chans, dim, rng):
        super().__init__()
        self.p = patch_size
        self.proj = Linear(patch_size * patch_size * in_chans, dim, rng)

    def forward(self, x):  # [B, C, H, W] -> [B, N, D]
        self.C = x.shape[1]
        return self.proj(patchify(x, self.p))

    def backward(self, dy):  # [B, N, D] -> [B, C, H, W]
        return unpatchify(self.proj.backward(dy), self.p, self.C)


# ----------------------------------------------------------------------------------------
# 3x3 convolution, padding 1, stride 1 (the conv U-ViT puts after unpatchify)
# ----------------------------------------------------------------------------------------

class Conv3x3(Module):
    """out[b, o] = sum_{c,i,j} W[o, c, i, j] xpad[b, c, y+i, x+j] + bias[o] (cross-correlation).

    Init as PyTorch's default for conv layers: W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """

    def __init__(self, c_in, c_out, rng):
        super().__init__()
        bound = 1.0 / math.sqrt(c_in * 9)
        self.params["W"] = rng.uniform(-bound, bound, (c_out, c_in, 3, 3))
        self.params["b"] = rng.uniform(-bound, bound, (c_out,))

    def forward(self, x):  # [B, C, H, W] -> [B, C_out, H, W]
        xp = xp_of(x, self.params["W"])
        B, C, H, W = x.shape
        self.shape = x.shape
        xpad = xp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="constant")  # [B, C, H+2, W+2]
        # im2col: the 9 shifted views, stacked: [B, C, 9, H, W] -> [B, C*9, H*W]
        cols = xp.stack([xpad[:, :, i:i + H, j:j + W] for i in range(3) for j in range(3)], axis=2)
        self.cols = cols.reshape(B, C * 9, H * W)
        Wm = self.params["W"].reshape(self.params["W"].shape[0], C * 9)  # [C_out, C*9]
        out = Wm @ self.cols + self.params["b"][:, None]           # [B, C_out, H*W]
        return out.reshape(B, -1, H, W)

    # out = Wm cols + b is a Linear on the columns: dWm = sum_b dout cols^T, db = sum dout,
    # dcols = Wm^T dout; each column entry is a shifted copy of x, so dx adds the 9 shifts back.
    def backward(self, dy):  # [B, C_out, H, W] -> [B, C, H, W]
        xp = xp_of(dy)
        B, C, H, W = self.shape
        Wfull = self.params["W"]
        dy2 = dy.reshape(B, Wfull.shape[0], H * W)                 # [B, C_out, H*W]
        self.grads["W"] = (dy2 @ self.cols.transpose(0, 2, 1)).sum(axis=0).reshape(Wfull.shape)
        self.grads["b"] = dy2.sum(axis=(0, 2))
        dcols = (Wfull.reshape(Wfull.shape[0], C * 9).T @ dy2).reshape(B, C, 9, H, W)
        dxpad = xp.zeros((B, C, H + 2, W + 2), dtype=dy.dtype)
        for n in range(9):
            i, j = divmod(n, 3)
            dxpad[:, :, i:i + H, j:j + W] += dcols[:, :, n]
        return dxpad[:, :, 1:-1, 1:-1]


# ----------------------------------------------------------------------------------------
# Conditioning: the label token, the time token, the positional embedding
# ----------------------------------------------------------------------------------------

class LabelEmbedding(Module):
    """A table of num_classes + 1 rows; the last row is the null label for classifier-free guidance.

    Init N(0, 1), PyTorch's default for an embedding table (U-ViT keeps it).
    """

    def __init__(self, num_classes, dim, rng):
        super().__init__()
        self.num_classes = num_classes  # valid labels: 0 .. num_classes (the last is "null")
        self.params["W"] = rng.normal(0.0, 1.0, (num_classes + 1, dim))

    def forward(self, y):  # [B] ints -> [B, D]
        self.y = y
        return self.params["W"][y]

    # Row y[b] of W was copied to output b, so dW[r] = sum of dy[b] over the b with y[b] = r:
    # dW = onehot(y)^T dy (a matmul, the same on every backend).
    def backward(self, dy):
        xp = xp_of(dy)
        W = self.params["W"]
        onehot = (self.y[:, None] == xp.arange(W.shape[0])[None, :]).astype(dy.dtype)  # [B, K+1]
        self.grads["W"] = onehot.T @ dy
        return None  # labels are integers: no gradient flows to them


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


class PosEmbed(Module):
    """A learned 1-D positional embedding [1, L, D], added to every sequence. Init N(0, 0.02)."""

    def __init__(self, length, dim, rng):
        super().__init__()
        self.params["pos"] = rng.normal(0.0, 0.02, (1, length, dim))

    def forward(self, x):  # [B, L, D] -> [B, L, D]
        return x + self.params["pos"]

    def backward(self, dy):
        self.grads["pos"] = dy.sum(axis=0, keepdims=True)
        return dy


# ----------------------------------------------------------------------------------------
# The transformer block, pre-norm, with U-ViT's optional long-skip input
# ----------------------------------------------------------------------------------------

class Block(Module):
    """x <- Linear(concat(x, skip)) (out-blocks only); x <- x + attn(LN(x)); x <- x + mlp(LN(x)).

    `skip` picks the long-skip form of an out-block: "concat" (U-ViT), "add", or None (in-blocks).
    """

    def __init__(self, dim, num_heads, mlp_ratio, rng, skip=None):
        super().__init__()
        if skip not in (None, "concat", "add"):
            raise ValueError(f"skip must be None, 'concat' or 'add', got {skip!r}")
        self.skip = skip
        self.skip_linear = Linear(2 * dim, dim, rng) if skip == "concat" else None
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, rng)
        self.norm2 = LayerNorm(dim)
        self.mlp = MLP(dim, dim * mlp_ratio, rng)

    def forward(self, x, skip=None):  # [B, L, D] (+ skip [B, L, D]) -> [B, L, D]
        if self.skip == "concat":  # U-ViT's choice: Linear(concat(x, skip)) replaces x
            x = self.skip_linear(xp_of(x, skip).concatenate([x, skip], axis=-1))  # [B, L, 2D] -> [B, L, D]
        elif self.skip == "add":   # the paper's weakest ablation: x + skip
            x = x + skip
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x

    # Each residual x + f(LN(x)) passes dy straight through and adds f's path back in.
    # Returns dx, or (dx, dskip) for an out-block.
    def backward(self, dy):
        dy = dy + self.norm2.backward(self.mlp.backward(dy))
        dy = dy + self.norm1.backward(self.attn.backward(dy))
        if self.skip is None:
            return dy
        if self.skip == "add":
            return dy, dy
        dcat = self.skip_linear.backward(dy)                   # [B, L, 2D]
        D = dcat.shape[-1] // 2
        return dcat[..., :D], dcat[..., D:]
