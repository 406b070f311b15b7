"""The array module: NumPy on the CPU, CuPy on the GPU, chosen once and used everywhere.

Layer code is written once against ``xp``, the array module of its inputs::

    xp = get_array_module(x)      # numpy for numpy arrays, cupy for cupy arrays
    y = xp.exp(x)

CuPy is imported only when the GPU backend is asked for, so ``import nfcore`` never needs it.
"""
import numpy as np

_backend = "numpy"


class BackendUnavailable(RuntimeError):
    """The GPU backend cannot be used on this machine (no CuPy, no driver, no GPU)."""


def _import_cupy():
    """Import CuPy, or say clearly why it cannot be used."""
    try:
        import cupy
    except ImportError as error:
        raise BackendUnavailable(
            "the GPU backend needs CuPy: install it with `pip install -e .[gpu]` "
            "(the cupy-cuda13x wheel)") from error
    try:
        n_devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CUDARuntimeError when no driver is present
        raise BackendUnavailable(f"CuPy is installed but no CUDA GPU can be used: {error}") from error
    if n_devices == 0:
        raise BackendUnavailable("CuPy is installed but no CUDA GPU is present")
    return cupy


def set_backend(name):
    """Choose where new arrays live: "numpy" (or "cpu") or "cupy" (or "gpu")."""
    global _backend
    aliases = {"numpy": "numpy", "cpu": "numpy", "cupy": "cupy", "gpu": "cupy"}
    if name not in aliases:
        raise ValueError(f"unknown backend {name!r}: choose one of {sorted(aliases)}")
    if aliases[name] == "cupy":
        _import_cupy()
    _backend = aliases[name]


def get_backend():
    """The name of the current backend: "numpy" or "cupy"."""
    return _backend


def default_array_module():
    """The array module new arrays are created with (numpy or cupy)."""
    return _import_cupy() if _backend == "cupy" else np


def is_cupy_array(x):
    """True for a CuPy array, without importing CuPy when it was never imported."""
    return type(x).__module__.startswith("cupy")


def get_array_module(x):
    """numpy for NumPy arrays, cupy for CuPy arrays (Chainer's ``xp``)."""
    if is_cupy_array(x):
        import cupy
        return cupy
    return np


def to_numpy(x):
    """A NumPy copy of ``x`` (from the GPU if needed)."""
    return x.get() if is_cupy_array(x) else np.asarray(x)


def to_device(x, backend=None):
    """Move an array to the given backend ("numpy"/"cupy"; default: the current one)."""
    name = get_backend() if backend is None else backend
    if name in ("cupy", "gpu"):
        return _import_cupy().asarray(x)
    return to_numpy(x)
