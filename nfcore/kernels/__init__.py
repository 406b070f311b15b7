"""Kernels of the masked k×k convolution: Numba CPU (``cpu``), Numba CUDA (``cuda``), and plain
NumPy references (``numpy_ref``). ``for_array(x)`` picks the compiled ones for x's device."""
from ..backend import get_array_module, is_cupy_array


def for_array(x):
    """The kernel module for x: ``cuda`` for CuPy arrays, ``cpu`` for NumPy arrays."""
    if is_cupy_array(x):
        from . import cuda
        return cuda
    from . import cpu
    return cpu


def input_grad_by_flips(conv_forward, dy, w):
    """dx[g, n, i, j, ci] = sum_{a, b, co} w[g, a, b, ci, co] * dy[g, n, i+(k-1)-a, j+(k-1)-b, co],
    the gradient of the top-left convolution with respect to its input (zero past the bottom
    and right edges), computed by ``conv_forward`` itself: substitute i -> H-1-i, j -> W-1-j and
    the bottom-right padding becomes top-left, so dx is the top-left convolution of the flipped
    dy with the channel-transposed w, flipped back. One kernel serves both directions.
    """
    xp = get_array_module(dy)
    w_transposed = xp.ascontiguousarray(w.transpose(0, 1, 2, 4, 3))
    dy_flipped = xp.ascontiguousarray(dy[:, :, ::-1, ::-1, :])
    return xp.ascontiguousarray(conv_forward(dy_flipped, w_transposed)[:, :, ::-1, ::-1, :])
