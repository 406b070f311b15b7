"""Kernels of the masked k×k convolution: Numba CPU (``cpu``), Numba CUDA (``cuda``), and plain
NumPy references (``numpy_ref``). ``for_array(x)`` picks the compiled ones for x's device.

Each module works on grouped arrays in its own axis order, given by its ``AXES``: the transpose
that takes the canonical (G, B, H, W, C) order to the module's. ``cuda`` and ``numpy_ref`` use
the canonical order (channel-last); ``cpu`` puts the batch last, (G, H, W, C, B). Weights are
(G, k, k, C_in, C_out) everywhere.
"""
from ..backend import get_array_module, is_cupy_array

CANONICAL_AXES = (0, 1, 2, 3, 4)     # (G, B, H, W, C)


def for_array(x):
    """The kernel module for x: ``cuda`` for CuPy arrays, ``cpu`` for NumPy arrays."""
    if is_cupy_array(x):
        from . import cuda
        return cuda
    from . import cpu
    return cpu


def to_groups_by_transpose(x, flips, axes):
    """(B, C, H, W) -> (G, B, H, W, Cg) transposed by ``axes``, G = len(flips) groups of
    Cg = C / G channels, group g's rows reversed when flips[g][0], its columns when
    flips[g][1] (its top-left form) and its channels when flips[g][2] (its lower-triangular
    self-tap). The array-module version ``cuda`` and ``numpy_ref`` use."""
    xp = get_array_module(x)
    B, C, H, W = x.shape
    G = len(flips)
    to_canonical = (1, 0, 3, 4, 2)                # (B, G, Cg, H, W) -> (G, B, H, W, Cg)
    x = x.reshape(B, G, C // G, H, W).transpose([to_canonical[axis] for axis in axes])
    out = xp.empty(x.shape, dtype=x.dtype)
    for g in range(G):
        out[g] = x[g][_flip_index(flips[g], axes)]
    return out


def from_groups_by_transpose(xg, flips, axes):
    """The inverse of ``to_groups_by_transpose``: back to (B, C, H, W)."""
    xp = get_array_module(xg)
    G = xg.shape[0]
    B, H, W, Cg = (xg.shape[axes.index(axis)] for axis in (1, 2, 3, 4))
    group_axes = axes[1:]                         # one group's axes, in canonical numbering
    to_bchw = [group_axes.index(axis) for axis in (1, 4, 2, 3)]
    out = xp.empty((B, G, Cg, H, W), dtype=xg.dtype)
    for g in range(G):
        out[:, g] = xg[g][_flip_index(flips[g], axes)].transpose(to_bchw)
    return out.reshape(B, G * Cg, H, W)


def _flip_index(flip, axes):
    """The index of one group (``axes`` without the group axis) that reverses its rows when
    flip[0], its columns when flip[1] and its channels when flip[2]."""
    index = [slice(None)] * 4
    for flipped, axis in zip(flip, (2, 3, 4)):    # rows, columns, channels (canonical axes)
        if flipped:
            index[axes.index(axis) - 1] = slice(None, None, -1)
    return tuple(index)


def to_layout(a, axes):
    """A canonical (G, B, H, W, C) array in the order ``axes`` of a kernel module, contiguous."""
    return get_array_module(a).ascontiguousarray(a.transpose(axes))


def from_layout(a, axes):
    """The inverse of ``to_layout``: back to (G, B, H, W, C), contiguous."""
    xp = get_array_module(a)
    inverse = [axes.index(axis) for axis in range(len(axes))]
    return xp.ascontiguousarray(a.transpose(inverse))


def input_grad_by_flips(conv_forward, dy, w, axes=CANONICAL_AXES):
    """dx[g, n, i, j, ci] = sum_{a, b, co} w[g, a, b, ci, co] * dy[g, n, i+(k-1)-a, j+(k-1)-b, co],
    the gradient of the top-left convolution with respect to its input (zero past the bottom
    and right edges), computed by ``conv_forward`` itself: substitute i -> H-1-i, j -> W-1-j and
    the bottom-right padding becomes top-left, so dx is the top-left convolution of the flipped
    dy with the channel-transposed w, flipped back. One kernel serves both directions.
    ``axes``: the module's axis order (the rows and columns are flipped wherever they are).
    """
    xp = get_array_module(dy)
    flip = [slice(None)] * 5
    flip[axes.index(2)] = flip[axes.index(3)] = slice(None, None, -1)
    flip = tuple(flip)
    w_transposed = xp.ascontiguousarray(w.transpose(0, 1, 2, 4, 3))
    dy_flipped = xp.ascontiguousarray(dy[flip])
    return xp.ascontiguousarray(conv_forward(dy_flipped, w_transposed)[flip])


class CanonicalLayout:
    """A kernel module seen through the canonical (G, B, H, W, C) layout: every array goes in
    and comes out in that order, whatever the module's own ``AXES``. For comparing kernels of
    different layouts (the tests, the benchmarks); the layers call the modules directly."""

    def __init__(self, module):
        self.module = module
        self.AXES = CANONICAL_AXES

    def conv_forward(self, x, w):
        axes = self.module.AXES
        return from_layout(self.module.conv_forward(to_layout(x, axes), w), axes)

    def conv_input_grad(self, dy, w):
        axes = self.module.AXES
        return from_layout(self.module.conv_input_grad(to_layout(dy, axes), w), axes)

    def conv_weight_grad(self, x, dy, k):
        axes = self.module.AXES
        return self.module.conv_weight_grad(to_layout(x, axes), to_layout(dy, axes), k)

    def wavefront_inverse(self, y, w):
        axes = self.module.AXES
        return from_layout(self.module.wavefront_inverse(to_layout(y, axes), w), axes)

    def raster_inverse(self, y, w):
        axes = self.module.AXES
        return from_layout(self.module.raster_inverse(to_layout(y, axes), w), axes)
