"""Fused CUDA kernels for the GPU path (CuPy, float32): the same math as the NumPy code in
layers.py and optim.py, in one kernel launch instead of five to twelve.

A small transformer on a GPU waits on kernel launches, not on arithmetic: one training step of
the `tiny` preset at batch 128 launched 994 kernels on an H200 and kept the GPU busy 27% of its
wall time. The plain CuPy path runs each `x - mean`, `* rstd`, `+ b` as its own kernel; these
kernels do a whole LayerNorm, softmax or GELU (forward or backward), an AdamW update or an EMA
update in one pass over memory.

Each function here has a reference: the plain array code beside it in layers.py / optim.py,
which NumPy always runs and which the GPU runs with `use(False)` (or TINYUVIT_FUSED=0).
tests/test_layers.py checks every kernel against it. Only float32 CuPy arrays take these
kernels; float64 (the gradient checks) keeps the plain path.

Row kernels (LayerNorm, softmax) give each row to one warp of 32 threads: the lanes stride
over the row, and warp shuffles add up (or take the max of) their partial results.
"""
import contextlib
import os

import numpy as np

from . import backend

_ENABLED = os.environ.get("TINYUVIT_FUSED", "1") != "0"

_SOURCE = r"""
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// One warp per row of D numbers: xhat = (x - mean) rstd, rstd = (var + eps)^-1/2,
// y = xhat g + b (affine) or xhat. keep: also write xhat [rows, D] and rstd [rows].
extern "C" __global__ void layernorm_fwd(const float* x, const float* g, const float* b,
        float* y, float* xhat, float* rstd, int rows, int D, float eps, int affine, int keep) {
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;                       // the whole warp leaves together
    const float* xr = x + (long long)row * D;
    float s = 0.f;
    for (int c = lane; c < D; c += 32) s += xr[c];
    float mu = warp_sum(s) / D;
    float q = 0.f;
    for (int c = lane; c < D; c += 32) { float d = xr[c] - mu; q += d * d; }
    float r = rsqrtf(warp_sum(q) / D + eps);
    float* yr = y + (long long)row * D;
    float* hr = xhat + (long long)row * D;
    for (int c = lane; c < D; c += 32) {
        float h = (xr[c] - mu) * r;
        if (keep) hr[c] = h;
        yr[c] = affine ? h * g[c] + b[c] : h;
    }
    if (keep && lane == 0) rstd[row] = r;
}

// One warp per row: h = dy g (affine) or dy; dx = rstd (h - mean(h) - xhat mean(h xhat)).
extern "C" __global__ void layernorm_bwd(const float* dy, const float* xhat, const float* rstd,
        const float* g, float* dx, int rows, int D, int affine) {
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float* dr = dy + (long long)row * D;
    const float* hr = xhat + (long long)row * D;
    float sh = 0.f, shx = 0.f;
    for (int c = lane; c < D; c += 32) {
        float h = affine ? dr[c] * g[c] : dr[c];
        sh += h;
        shx += h * hr[c];
    }
    float mh = warp_sum(sh) / D, mhx = warp_sum(shx) / D, r = rstd[row];
    float* out = dx + (long long)row * D;
    for (int c = lane; c < D; c += 32) {
        float h = affine ? dr[c] * g[c] : dr[c];
        out[c] = r * (h - mh - hr[c] * mhx);
    }
}

// One warp per row of n scores: p = exp(s - max) / sum exp(s - max).
extern "C" __global__ void softmax_fwd(const float* s, float* p, int rows, int n) {
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float* sr = s + (long long)row * n;
    float m = __int_as_float(0xff800000);   // -inf
    for (int c = lane; c < n; c += 32) m = fmaxf(m, sr[c]);
    m = warp_max(m);
    float z = 0.f;
    for (int c = lane; c < n; c += 32) z += expf(sr[c] - m);
    float inv = 1.f / warp_sum(z);
    float* pr = p + (long long)row * n;
    for (int c = lane; c < n; c += 32) pr[c] = expf(sr[c] - m) * inv;
}

// One warp per row: ds = p (dp - sum(dp p)).
extern "C" __global__ void softmax_bwd(const float* p, const float* dp, float* ds, int rows, int n) {
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float* pr = p + (long long)row * n;
    const float* dr = dp + (long long)row * n;
    float t = 0.f;
    for (int c = lane; c < n; c += 32) t += dr[c] * pr[c];
    t = warp_sum(t);
    float* out = ds + (long long)row * n;
    for (int c = lane; c < n; c += 32) out[c] = pr[c] * (dr[c] - t);
}

// gelu(x) = x Phi(x); with_slope: also Phi(x) + x phi(x).
extern "C" __global__ void gelu_fwd(const float* x, float* y, float* slope, int n, int with_slope) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float v = x[i];
        float cdf = 0.5f * (1.f + erff(v * 0.70710678118654752f));
        y[i] = v * cdf;
        if (with_slope) slope[i] = cdf + v * expf(-0.5f * v * v) * 0.39894228040143268f;
    }
}

// AdamW on a flat buffer: p *= decay where decayed (mode 1: all, 2: where mask[i]), then
// m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, p -= step (m / (sqrt(v / c2) + eps)).
extern "C" __global__ void adamw_step(float* p, const float* g, float* m, float* v,
        const unsigned char* mask, int n, int mode, float decay, float b1, float b2,
        float inv_c2, float step, float eps) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float gi = g[i];
        float pi = p[i];
        if (mode == 1 || (mode == 2 && mask[i])) pi *= decay;
        float mi = b1 * m[i] + (1.f - b1) * gi;
        float vi = b2 * v[i] + (1.f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi - step * mi / (sqrtf(vi * inv_c2) + eps);
    }
}

// EMA: e = d e + (1 - d) p.
extern "C" __global__ void ema_update(float* e, const float* p, int n, float d) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        e[i] = d * e[i] + (1.f - d) * p[i];
}
"""

_NAMES = ("layernorm_fwd", "layernorm_bwd", "softmax_fwd", "softmax_bwd", "gelu_fwd", "adamw_step",
          "ema_update")
_module = None
_THREADS = 256               # threads per block
_ROWS_PER_BLOCK = _THREADS // 32   # row kernels: one warp of 32 threads per row
_INT_MAX = 2 ** 31 - 1


def source():
    """The CUDA C source of every kernel (tests compile it without a GPU where NVRTC is present)."""
    return _SOURCE


def _kernel(name):
    global _module
    if _module is None:
        _module = backend.cupy_module().RawModule(code=_SOURCE)    # compiled by NVRTC on first use, then cached
    return _module.get_function(name)


@contextlib.contextmanager
def use(flag):
    """Within the block, fused kernels on (True) or off (False: the plain array code on CuPy)."""
    global _ENABLED
    before, _ENABLED = _ENABLED, bool(flag)
    try:
        yield
    finally:
        _ENABLED = before


def enabled():
    return _ENABLED


def fits(*arrays):
    """Whether these arrays take the fused kernels: float32 CuPy arrays of fewer than 2^31
    numbers, with the kernels switched on."""
    cp = backend.cupy_module()
    return (_ENABLED and cp is not None and all(isinstance(a, cp.ndarray) and a.dtype == np.float32
                                                  and a.size <= _INT_MAX for a in arrays))


def fits_in_place(*arrays):
    """`fits`, and every array is one contiguous block (updated in place by the kernel)."""
    return fits(*arrays) and all(a.flags.c_contiguous for a in arrays)


def _rows_grid(rows):
    return ((rows + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK,), (_THREADS,)


def _flat_grid(n):
    return (max(1, min((n + _THREADS - 1) // _THREADS, 1 << 16)),), (_THREADS,)


def _c(a):
    return backend.cupy_module().ascontiguousarray(a)


# ----------------------------------------------------------------------------------------
# The kernels' Python faces: same arguments and results as the references in layers / optim
# ----------------------------------------------------------------------------------------

def layernorm_forward(x, g, b, eps, keep):
    """(y, xhat, rstd) of LayerNorm over the last axis; xhat and rstd are None unless keep.
    g, b None: no affine part (y is xhat)."""
    cp = backend.cupy_module()
    x = _c(x)
    D = x.shape[-1]
    rows = x.size // D
    y = cp.empty_like(x)
    xhat = cp.empty_like(x) if keep else y
    rstd = cp.empty(x.shape[:-1] + (1,), np.float32) if keep else y
    affine = g is not None
    grid, block = _rows_grid(rows)
    _kernel("layernorm_fwd")(grid, block, (x, _c(g) if affine else x, _c(b) if affine else x, y, xhat, rstd,
                                           np.int32(rows), np.int32(D), np.float32(eps), np.int32(affine),
                                           np.int32(keep)))
    return (y, xhat, rstd) if keep else (y, None, None)


def layernorm_backward(dy, xhat, rstd, g):
    """dx of LayerNorm given dy, the saved xhat and rstd, and the scale g (None: no affine)."""
    cp = backend.cupy_module()
    dy, xhat, rstd = _c(dy), _c(xhat), _c(rstd)
    D = dy.shape[-1]
    rows = dy.size // D
    dx = cp.empty_like(dy)
    affine = g is not None
    grid, block = _rows_grid(rows)
    _kernel("layernorm_bwd")(grid, block, (dy, xhat, rstd, _c(g) if affine else dy, dx, np.int32(rows),
                                           np.int32(D), np.int32(affine)))
    return dx


def softmax(s):
    """softmax over the last axis (a new array)."""
    cp = backend.cupy_module()
    s = _c(s)
    n = s.shape[-1]
    rows = s.size // n
    p = cp.empty_like(s)
    grid, block = _rows_grid(rows)
    _kernel("softmax_fwd")(grid, block, (s, p, np.int32(rows), np.int32(n)))
    return p


def softmax_backward(p, dp):
    """ds = p (dp - sum(dp p)) over the last axis (a new array)."""
    cp = backend.cupy_module()
    p, dp = _c(p), _c(dp)
    n = p.shape[-1]
    rows = p.size // n
    ds = cp.empty_like(p)
    grid, block = _rows_grid(rows)
    _kernel("softmax_bwd")(grid, block, (p, dp, ds, np.int32(rows), np.int32(n)))
    return ds


def gelu(x, slope=False):
    """gelu(x), or (gelu(x), its slope) with slope=True."""
    cp = backend.cupy_module()
    x = _c(x)
    y = cp.empty_like(x)
    s = cp.empty_like(x) if slope else y
    grid, block = _flat_grid(x.size)
    _kernel("gelu_fwd")(grid, block, (x, y, s, np.int32(x.size), np.int32(slope)))
    return (y, s) if slope else y


def adamw_step(p, g, m, v, decayed, decay, b1, b2, c2, step, eps):
    """One AdamW update of the flat arrays p, m, v in place, as optim.AdamW.step does:
    decayed True / False / a boolean mask; decay = 1 - lr wd; step = lr / c1."""
    mode = 1 if decayed is True else 0 if decayed is False else 2
    mask = _c(decayed) if mode == 2 else p
    grid, block = _flat_grid(p.size)
    _kernel("adamw_step")(grid, block, (p, _c(g), m, v, mask, np.int32(p.size), np.int32(mode),
                                        np.float32(decay), np.float32(b1), np.float32(b2),
                                        np.float32(1.0 / c2), np.float32(step), np.float32(eps)))


def ema_update(e, p, d):
    """e = d e + (1 - d) p, in place."""
    grid, block = _flat_grid(e.size)
    _kernel("ema_update")(grid, block, (e, _c(p), np.int32(e.size), np.float32(d)))
