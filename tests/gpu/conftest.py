"""The GPU tests: the CUDA kernels (nfcore/kernels/cuda.py) against the CPU kernels.

They run in one of two modes, and are skipped otherwise:

- on a real CUDA GPU (with CuPy installed the arrays are CuPy arrays, else NumPy arrays that
  the kernels copy to the device and back);
- under Numba's CUDA simulator, ``NUMBA_ENABLE_CUDASIM=1``: the kernels run in Python threads
  on NumPy arrays, no GPU needed, slowly, so the shapes here are tiny::

      NUMBA_ENABLE_CUDASIM=1 PYTHONPATH=. python -m pytest -q tests/gpu

The variable has to be set before Numba is imported, so the simulator run is its own pytest
process; a plain ``pytest tests`` on a machine without a GPU skips everything in this folder.
"""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from numba import config as numba_config

SIMULATOR = bool(numba_config.ENABLE_CUDASIM)
SKIP_REASON = "no CUDA GPU and NUMBA_ENABLE_CUDASIM is not set"


def _real_gpu():
    """True when Numba sees a CUDA driver and at least one GPU (never under the simulator)."""
    if SIMULATOR:
        return False
    try:
        from numba import cuda
        return bool(cuda.is_available())
    except Exception:   # a broken driver install: no GPU for these tests
        return False


def _cupy_usable():
    """True when CuPy imports and sees a GPU."""
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


REAL_GPU = _real_gpu()
CUPY = REAL_GPU and _cupy_usable()
AVAILABLE = SIMULATOR or REAL_GPU
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Without a GPU and without the simulator, mark every test of this folder skipped
    (the hook sees the whole session's items, so only those under tests/gpu are touched)."""
    if AVAILABLE:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(skip)


def pytest_report_header(config):
    mode = ("CUDA simulator (NumPy arrays)" if SIMULATOR
            else f"real GPU ({'CuPy' if CUPY else 'NumPy'} arrays)" if REAL_GPU
            else f"skipped: {SKIP_REASON}")
    return f"tests/gpu: {mode}"


@pytest.fixture(scope="session", autouse=True)
def _fast_simulator_barriers():
    """The simulator's block manager polls its threads while holding the GIL; a short switch
    interval lets the simulated threads reach their barriers sooner (about 5x faster here)."""
    if not SIMULATOR:
        yield
        return
    old = sys.getswitchinterval()
    sys.setswitchinterval(5e-5)
    yield
    sys.setswitchinterval(old)


@pytest.fixture(scope="session")
def gpu():
    """The CUDA kernel module (imported only once a test needs it)."""
    from nfcore.kernels import cuda
    return cuda


@pytest.fixture(scope="session")
def xp():
    """The array module of the kernels' inputs: CuPy on a real GPU with CuPy, else NumPy."""
    if CUPY:
        import cupy
        return cupy
    return np


def to_host(a):
    """A NumPy array from a NumPy or CuPy array."""
    return a.get() if type(a).__module__.startswith("cupy") else np.asarray(a)



def assert_close(actual, expected, dtype):
    """Equal up to rounding, on the host, same dtype and shape: the GPU fuses multiplies and adds
    (FMA) and the weight gradient sums in another order, so bit-for-bit equality is not asked
    for."""
    actual, expected = to_host(actual), to_host(expected)
    assert isinstance(actual, np.ndarray)
    assert actual.dtype == expected.dtype == dtype and actual.shape == expected.shape
    tol = 1e-4 if dtype == np.float32 else 1e-11
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)