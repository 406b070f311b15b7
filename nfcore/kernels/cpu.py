"""Numba CPU kernels of the masked k×k convolution in its top-left form.

Every array here is channel-last and grouped, so that one kernel serves InvConv (G = 1) and
the FInC unit (G = 4 quarters, each already flipped into the top-left form)::

    x, y  : (G, B, H, W, C)     images, channel-last, C-contiguous
    w     : (G, k, k, C, C)     w[g, a, b, ci, co], the effective (masked) weight

The top-left convolution, zero padding on the top and the left::

    y[g, n, i, j, co] = sum_{a, b, ci} w[g, a, b, ci, co] * x[g, n, i-(k-1)+a, j-(k-1)+b, ci]

The tap a = b = k-1 couples a pixel to itself; its C×C block L[co, ci] = w[g, k-1, k-1, ci, co]
is lower triangular (nonzero only for co >= ci) with a nonzero diagonal, so the whole Jacobian is
triangular when pixels are ordered by i + j, and the inverse is solved one anti-diagonal at a
time (pixels with equal i + j do not depend on each other).

The inner loops run over the output channel ``co``, the contiguous axis of ``w`` and ``y``, so
that LLVM vectorizes them. No temporaries are allocated inside the loops: forward accumulates
straight into ``y``, the inverse straight into ``x``.
"""
import numpy as np
from numba import njit, prange

from . import input_grad_by_flips


@njit(inline="always")
def _add_taps(out, x, w, g, n, i, j, include_self):
    """out[co] += sum over taps of w[g, a, b, ci, co] * x[g, n, i-(k-1)+a, j-(k-1)+b, ci].

    With ``include_self`` False the self-tap (k-1, k-1) is left out (the inverse's right side).
    """
    k = w.shape[1]
    C_in = w.shape[3]
    C_out = w.shape[4]
    for a in range(k):
        ii = i - (k - 1) + a
        if ii < 0:
            continue
        for b in range(k):
            jj = j - (k - 1) + b
            if jj < 0:
                continue
            if not include_self and a == k - 1 and b == k - 1:
                continue
            for ci in range(C_in):
                xv = x[g, n, ii, jj, ci]
                for co in range(C_out):
                    out[co] += w[g, a, b, ci, co] * xv


@njit(inline="always")
def _solve_pixel(x, y, w, g, n, i, j):
    """Solve pixel (i, j) of x, all pixels it depends on being solved already.

    r = y[i, j] - (all taps but the self-tap applied to x), then forward substitution through
    the lower-triangular self-tap L[co, ci] = w[g, k-1, k-1, ci, co]:
    x[c] = (r[c] - sum_{c' < c} L[c, c'] x[c']) / L[c, c], column by column, in place in x.
    """
    k = w.shape[1]
    C = x.shape[4]
    r = x[g, n, i, j]                      # a view: the pixel being solved, written in place
    _add_taps(r, x, w, g, n, i, j, False)
    for c in range(C):
        r[c] = y[g, n, i, j, c] - r[c]
    for ci in range(C):
        r[ci] = r[ci] / w[g, k - 1, k - 1, ci, ci]
        for co in range(ci + 1, C):
            r[co] -= w[g, k - 1, k - 1, ci, co] * r[ci]


@njit(parallel=True, cache=True)
def conv_forward(x, w):
    """y = the top-left masked convolution of x with w. Parallel over (group, batch, row)."""
    G, B, H, W, _ = x.shape
    y = np.zeros((G, B, H, W, w.shape[4]), dtype=x.dtype)
    for t in prange(G * B * H):
        g = t // (B * H)
        n = (t // H) % B
        i = t % H
        for j in range(W):
            _add_taps(y[g, n, i, j], x, w, g, n, i, j, True)
    return y


@njit(parallel=True, cache=True)
def wavefront_inverse(y, w):
    """x such that conv_forward(x, w) == y, solved anti-diagonal by anti-diagonal.

    For d = 0 .. H+W-2 (sequential), every pixel with i + j = d in every group and batch element
    is solved in parallel by ``_solve_pixel``.
    """
    G, B, H, W, _ = y.shape
    x = np.zeros_like(y)
    for d in range(H + W - 1):
        i_first = max(0, d - (W - 1))
        n_pixels = min(H - 1, d) - i_first + 1
        for t in prange(G * B * n_pixels):
            g = t // (B * n_pixels)
            n = (t // n_pixels) % B
            i = i_first + t % n_pixels
            _solve_pixel(x, y, w, g, n, i, d - i)
    return x


@njit(parallel=True, cache=True)
def raster_inverse(y, w):
    """The same solve, pixel after pixel in raster order (Emerging's way: H·W sequential steps,
    parallel only over group and batch). The baseline the wavefront is measured against."""
    G, B, H, W, _ = y.shape
    x = np.zeros_like(y)
    for t in prange(G * B):
        g = t // B
        n = t % B
        for i in range(H):
            for j in range(W):
                _solve_pixel(x, y, w, g, n, i, j)
    return x


@njit(parallel=True, cache=True)
def conv_weight_grad(x, dy, k):
    """dw[g, a, b, ci, co] = sum_{n, i, j} x[g, n, i-(k-1)+a, j-(k-1)+b, ci] * dy[g, n, i, j, co].

    Parallel over (group, tap); each tap is a sum over the batch and the pixels it reaches.
    """
    G, B, H, W, C_in = x.shape
    C_out = dy.shape[4]
    dw = np.zeros((G, k, k, C_in, C_out), dtype=x.dtype)
    for t in prange(G * k * k):
        g = t // (k * k)
        a = (t // k) % k
        b = t % k
        acc = dw[g, a, b]
        for n in range(B):
            for i in range(k - 1 - a, H):
                ii = i - (k - 1) + a
                for j in range(k - 1 - b, W):
                    jj = j - (k - 1) + b
                    for ci in range(C_in):
                        xv = x[g, n, ii, jj, ci]
                        for co in range(C_out):
                            acc[ci, co] += xv * dy[g, n, i, j, co]
    return dw


def conv_input_grad(dy, w):
    """dx = the gradient of conv_forward with respect to x: see ``input_grad_by_flips``."""
    return input_grad_by_flips(conv_forward, dy, w)
