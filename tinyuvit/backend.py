"""The one place that picks the array module: NumPy on the CPU, CuPy on an NVIDIA GPU.

Every other module asks `xp_of(array)` (or holds a `Backend`) instead of importing CuPy.
When the gradient tests trace a forward pass with HIPS autograd, arrays arrive as autograd
boxes, and `xp_of` hands back `autograd.numpy` so that the very same forward code is traced.
"""
import os

import numpy as np

try:  # CuPy is optional: `pip install tinyuvit[gpu]`
    import cupy as _cupy
except Exception:  # ImportError, or a CuPy that cannot find its CUDA libraries
    _cupy = None


from .errors import BackendError  # noqa: F401  (raised here; defined with the other errors)


DTYPES = {"float32": np.float32, "float64": np.float64}


def cupy_status():
    """(usable, reason): whether CuPy imports and sees at least one GPU, and if not, why."""
    if _cupy is None:
        return False, ("CuPy is not installed: install it with `pip install cupy-cuda12x` "
                       "(or cupy-cuda13x, matching your CUDA), or run with --device cpu")
    try:
        n = _cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, no device
        n, err = 0, str(e).splitlines()[0] if str(e) else type(e).__name__
    else:
        err = "no CUDA device found"
    if n < 1:
        return False, f"CuPy is installed but no usable GPU was found ({err}); run with --device cpu"
    return True, ""


class Backend:
    """An array module (numpy or cupy) plus the float dtype for compute."""

    def __init__(self, device="cpu", dtype="float32"):
        if device not in ("cpu", "gpu"):
            raise BackendError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if dtype not in DTYPES:
            raise BackendError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if device == "gpu":
            ok, why = cupy_status()
            if not ok:
                raise BackendError(why)
            self.xp = _cupy
        else:
            self.xp = np
        self.device, self.dtype_name, self.dtype = device, dtype, DTYPES[dtype]

    def asarray(self, a, dtype=None):
        """Move a host (or device) array here, cast to the compute dtype unless told otherwise."""
        return self.xp.asarray(a, dtype=self.dtype if dtype is None else dtype)

    def __deepcopy__(self, memo):  # holds a module: copies of a model share their backend
        return self

    def __repr__(self):
        return f"Backend(device={self.device!r}, dtype={self.dtype_name!r})"


def xp_of(*arrays):
    """The array module that owns the arrays: cupy, numpy, or autograd.numpy while tracing."""
    for x in arrays:
        if type(x).__name__ == "ArrayBox":  # HIPS autograd is tracing this forward pass
            import autograd.numpy as anp
            return anp
    for x in arrays:
        if _cupy is not None and isinstance(x, _cupy.ndarray):
            return _cupy
    return np


def erf(x):
    """The error function on whichever backend owns `x` (NumPy itself has none).

    NumPy float64 (gradient checks) uses scipy's erf; NumPy float32 (training) uses
    `_erf_rational`, within 4e-7 of it and 7x faster (timings below `_ERF_Q`)."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        import cupyx.scipy.special
        return cupyx.scipy.special.erf(x)
    if type(x).__name__ == "ArrayBox":
        import autograd.scipy.special
        return autograd.scipy.special.erf(x)
    import scipy.special
    x = np.asarray(x)
    return _erf_rational(x) if x.dtype == np.float32 else scipy.special.erf(x)


def elementwise(f, x):
    """f(x) for an elementwise f that returns an array or a tuple of arrays shaped like x.

    NumPy sends each temporary of a big array out to main memory and back. So on NumPy, x is
    cut into pieces of _PIECE elements, whose temporaries stay in the core's cache. The values
    are those of f(x) in one piece. CuPy and autograd: f(x)."""
    if type(x) is not np.ndarray or x.size <= _PIECE:
        return f(x)
    flat = np.ascontiguousarray(x).reshape(-1)
    outs, single = None, False
    for a in range(0, flat.size, _PIECE):
        res = f(flat[a:a + _PIECE])
        if outs is None:
            single = not isinstance(res, tuple)
            outs = [np.empty(flat.size, r.dtype) for r in ((res,) if single else res)]
        for out, r in zip(outs, (res,) if single else res):
            out[a:a + _PIECE] = r
    outs = [out.reshape(x.shape) for out in outs]
    return outs[0] if single else tuple(outs)


# erf(x) ~ x P(x^2) / Q(x^2) on |x| <= 4 (|erf| > 1 - 2e-8 beyond, so x is clipped there).
# The degree-5 / degree-5 coefficients were fitted by weighted least squares (Lawson's
# iteration towards minimax) to scipy's erf on 20,001 points: max error 2e-8 in float64,
# 4e-7 when evaluated in float32 (tests/test_layers.py checks it). scipy's float32 erf is
# scalar code; these are a dozen vectorized multiply-adds. Measured on one 32,768-element
# float32 piece (what GELU passes, see `elementwise`), A/B in one process, medians of 75 calls
# on a shared 2-core machine: scipy 0.36 ms, this 0.052 ms (7x faster), np.exp 0.011 ms
# (scipy's erf costs 32 np.exp, this one 4.5).
_ERF_P = (1.12837898e+00, 1.96249222e-01, 5.34675090e-02, 4.00365776e-03, 2.88041923e-04,
          1.97482983e-06)
_ERF_Q = (1.0, 5.07252503e-01, 1.16476527e-01, 1.54444430e-02, 1.21636339e-03, 3.74808893e-05)


def _erf_rational(x):
    """float32 erf by the rational approximation above (Horner's rule, in place)."""
    x = np.clip(x, -4.0, 4.0, dtype=np.float32)
    s = x * x
    p = s * np.float32(_ERF_P[-1])
    q = s * np.float32(_ERF_Q[-1])
    for k in range(len(_ERF_P) - 2, 0, -1):   # ((c5 s + c4) s + c3) s ... + c1) s
        p += np.float32(_ERF_P[k])
        p *= s
        q += np.float32(_ERF_Q[k])
        q *= s
    p += np.float32(_ERF_P[0])
    q += np.float32(_ERF_Q[0])
    p *= x
    p /= q
    return p


_PIECE = 1 << 15   # elements: 128 KiB of float32 per temporary; a few fit in a core's L2
_THREADS = None


def cpu_threads():
    """CPU threads that tinyuvit runs the model on (`set_cpu_threads`; default: every core)."""
    return _THREADS or os.cpu_count() or 1


def set_cpu_threads(n):
    """Run on n CPU threads (None: every core): the model splits each batch across them
    (tinyuvit.tools.parallel), other work uses n BLAS threads. On a machine whose cores are busy with
    other work, fewer threads can be much faster: BLAS threads that wait for a busy core spin."""
    global _THREADS
    if n is None:
        return
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        from .errors import ConfigError
        raise ConfigError(f"threads (--threads) must be a whole number >= 1, got {n!r}")
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=n)
    _THREADS = n


def cupy_module():
    """The CuPy module if it imported, else None (tinyuvit.kernels asks here, not `import cupy`)."""
    return _cupy


_ONES = {}


def sum_rows(a):
    """The sum over the rows of a 2-D array [n, D] -> [D] (a bias gradient, say).

    NumPy: a.sum(axis=0). CuPy: a matrix-vector product with a vector of n ones, which cuBLAS
    runs far faster than CuPy's own sum over axis 0: on an H200 those sums took 168 of the 485 ms
    of a `small` training step at batch 512."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        key = (a.shape[0], a.dtype.str, _cupy.cuda.Device().id)
        if key not in _ONES:
            _ONES[key] = _cupy.ones(a.shape[0], dtype=a.dtype)
        return _ONES[key] @ a
    return a.sum(axis=0)


def to_numpy(x):
    """A host NumPy copy of any backend's array (no-op for NumPy arrays)."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return _cupy.asnumpy(x)
    return np.asarray(x)


def synchronize(x=None):
    """Wait for queued GPU work to finish (for honest timers); nothing to do on the CPU."""
    if _cupy is not None and (x is None or isinstance(x, _cupy.ndarray)):
        try:
            _cupy.cuda.Stream.null.synchronize()
        except Exception:
            pass
