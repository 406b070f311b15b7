"""Kernels of the masked k×k convolution: Numba CPU (``cpu``), Numba CUDA (``cuda``), and plain
NumPy references (``numpy_ref``). ``for_array(x)`` picks the compiled ones for x's device."""
from ..backend import is_cupy_array


def for_array(x):
    """The kernel module for x: ``cuda`` for CuPy arrays, ``cpu`` for NumPy arrays."""
    if is_cupy_array(x):
        from . import cuda
        return cuda
    from . import cpu
    return cpu
