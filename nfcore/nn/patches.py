"""im2col and col2im on channel-last images: a k×k convolution's patch matrix and its transpose.

Shapes: x (B, H, W, C), channel-last; cols (B·H·W, k·k·C); k odd, p = k // 2::

    cols[(n, i, j), (a, b, c)] = x[n, i - p + a, j - p + b, c]        (0 outside the image)

Row (n, i, j) of cols is the k×k patch around pixel (n, i, j), its columns ordered (a, b, c), so
that a convolution is one matrix product of cols with the weight laid out as (k·k·C, O). With
channel-last images every tap (a, b) of a patch is C contiguous values of x, and every row of
cols is contiguous: no transposes.

col2im is the transpose (adjoint) of im2col: it adds each entry of cols back into the pixel it
was copied from, so overlapping patches sum::

    x[n, i, j, c] = sum_{a, b} cols[(n, i + p - a, j + p - b), (a, b, c)]     (rows inside the image)

``<im2col(x), cols> = <x, col2im(cols)>`` for any x and cols. Written in this gather form (each
output pixel reads the k·k rows that hold it) the threads never write to the same pixel.

Two implementations of each, which the tests compare:

    im2col_numba, col2im_numba   Numba kernels, parallel over image rows (n, i), no temporaries
                                 in the loops: what NumPy arrays use (im2col_into and
                                 col2im_into write into a given array: conv2d.py's blocks)
    im2col_numpy, col2im_numpy   plain array code, k·k strided slice copies: the reference, and
                                 what CuPy arrays use

``im2col`` and ``col2im`` pick one for the array's module. For k = 1 both are reshapes (views).
"""
import numpy as np
from numba import njit, prange

from ..backend import get_array_module, is_cupy_array


@njit(parallel=True, cache=True)
def im2col_into(x, k, cols):
    """cols (B·H·W, k·k·C) = the patch matrix of x (B, H, W, C), written into a given array
    (a block's buffer, reused: see conv2d.py's blocking); parallel over the B·H image rows."""
    B, H, W, C = x.shape
    p = k // 2
    for row in prange(B * H):
        n = row // H
        i = row % H
        for j in range(W):
            patch = cols[row * W + j]                # the k·k·C values of pixel (n, i, j)
            for a in range(k):
                ii = i - p + a
                for b in range(k):
                    jj = j - p + b
                    start = (a * k + b) * C
                    if 0 <= ii < H and 0 <= jj < W:
                        for c in range(C):
                            patch[start + c] = x[n, ii, jj, c]
                    else:
                        for c in range(C):
                            patch[start + c] = 0
    return cols


@njit(parallel=True, cache=True)
def col2im_into(cols, x, k):
    """x (B, H, W, C) = col2im(cols), written into a given array (a slice of a larger output:
    see conv2d.py's blocking); parallel over the B·H image rows."""
    B, H, W, C = x.shape
    p = k // 2
    for row in prange(B * H):
        n = row // H
        i = row % H
        for j in range(W):
            pixel = x[n, i, j]                       # C values, summed over the k·k patches
            for c in range(C):
                pixel[c] = 0
            for a in range(k):
                ii = i + p - a                       # the patch centred at (ii, jj) holds (i, j)
                if ii < 0 or ii >= H:                # at tap (a, b)
                    continue
                for b in range(k):
                    jj = j + p - b
                    if jj < 0 or jj >= W:
                        continue
                    source = cols[(n * H + ii) * W + jj]
                    start = (a * k + b) * C
                    for c in range(C):
                        pixel[c] += source[start + c]
    return x


def im2col_numba(x, k):
    """(B, H, W, C) -> cols (B·H·W, k·k·C), a new array (the Numba kernel im2col_into)."""
    B, H, W, C = x.shape
    return im2col_into(x, k, np.empty((B * H * W, k * k * C), dtype=x.dtype))


def col2im_numba(cols, B, H, W, k):
    """cols (B·H·W, k·k·C) -> x (B, H, W, C), a new array, overlapping patches summed."""
    C = cols.shape[1] // (k * k)
    return col2im_into(cols, np.empty((B, H, W, C), dtype=cols.dtype), k)


def im2col_numpy(x, k):
    """The reference im2col: one strided slice copy per tap (a, b) of the padded image."""
    xp = get_array_module(x)
    B, H, W, C = x.shape
    p = k // 2
    padded = xp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    cols = xp.empty((B, H, W, k, k, C), dtype=x.dtype)
    for a in range(k):
        for b in range(k):
            cols[:, :, :, a, b] = padded[:, a:a + H, b:b + W]
    return cols.reshape(B * H * W, k * k * C)


def col2im_numpy(cols, shape, k):
    """The reference col2im: each tap's slice added into the padded image, the padding cut off."""
    xp = get_array_module(cols)
    B, H, W, C = shape
    p = k // 2
    cols = cols.reshape(B, H, W, k, k, C)
    padded = xp.zeros((B, H + 2 * p, W + 2 * p, C), dtype=cols.dtype)
    for a in range(k):
        for b in range(k):
            padded[:, a:a + H, b:b + W] += cols[:, :, :, a, b]
    return padded[:, p:p + H, p:p + W]


def im2col(x, k):
    """cols (B·H·W, k·k·C) of x (B, H, W, C): the Numba kernel for NumPy arrays, else NumPy code."""
    B, H, W, C = x.shape
    if k == 1:
        return x.reshape(B * H * W, C)
    if is_cupy_array(x):
        return im2col_numpy(x, k)
    return im2col_numba(np.ascontiguousarray(x), k)


def col2im(cols, shape, k):
    """x (B, H, W, C) = shape from cols (B·H·W, k·k·C): the transpose of ``im2col``."""
    if k == 1:
        return cols.reshape(shape)
    if is_cupy_array(cols):
        return col2im_numpy(cols, shape, k)
    B, H, W, _ = shape
    return col2im_numba(np.ascontiguousarray(cols), B, H, W, k)
