"""Shared fixtures: the `backend` parameter runs a test on NumPy and, where a GPU is usable, CuPy."""
import os

# The tests' matrices are tiny: one BLAS thread is fastest for them, and threads that spin
# waiting for a busy core made each small matmul ~50x slower on a loaded 2-core machine.
# (Set before NumPy is first imported; an explicit setting in the environment wins.)
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402

from tinyuvit.backend import cupy_status  # noqa: E402

BACKENDS = ["numpy", "cupy"]
DEVICE = {"numpy": "cpu", "cupy": "gpu"}


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The device name for `tinyuvit.backend.Backend`: "cpu", or "gpu" (skipped without CuPy/GPU)."""
    if request.param == "cupy":
        ok, why = cupy_status()
        if not ok:
            pytest.skip(f"cupy backend unavailable: {why}")
    return DEVICE[request.param]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, an empty cache: MNIST is the embedded subset (10,000 training digits)."""
    from tinyuvit.tools import data
    monkeypatch.setattr(data, "MIRRORS", [])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("TINYUVIT_DATA", raising=False)
