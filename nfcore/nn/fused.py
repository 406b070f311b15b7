"""Fused elementwise passes of the coupling networks and the affine coupling: one Numba loop
where NumPy makes several passes over the array (and allocates a temporary for each).

Every pass has its plain NumPy reference beside it (the ``*_numpy`` functions, the code the
layers ran before); the tests compare the two (tests/test_fused_kernels.py). The layers call
the Numba kernels for NumPy arrays while ``FUSED`` is true, the references for CuPy arrays or
when ``FUSED`` is set to False (the tests do, to run a whole model both ways).

Rows (R, O): a channel-last activation (B, H, W, O) seen as its B·H·W pixel rows.

    bias_relu(y, bias)              y = max(y + bias, 0), in place (the ReLU's mask is y > 0
                                    afterwards: y > 0 exactly where y + bias > 0; NaN stays NaN)
    relu_backward_bias(dy, out)     dx = dy · (out > 0), in place on dy, and dbias = Σ_rows dx
    scale_bias(g, bias, e)          u = g + bias (in place on g), y = u · e
    scale_bias_backward(dy, u, e)   du = dy · e, dlogs_sum = Σ_rows du · u, dbias = Σ_rows du

The reductions are cut into a fixed number of row blocks (not one per thread), summed in
float64 within each block, so a result does not depend on the thread count.

The affine coupling's passes (log-scale, scale, output, log-det, and their backward and inverse)
are in nfcore/layers/coupling.py, with the same pattern; ``affine_*_numba`` below are their
kernels: they read the network's output h channel-last (B, H, W, 2·Cb) as the network makes
it, and the coupling's x, y, dy blocks channel-first (B, Cb, H, W), so that neither h nor dh
is converted between the layouts.
"""
import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from ..backend import get_array_module, is_cupy_array

FUSED = True          # False: every layer runs the NumPy references (tests compare the two)
REDUCE_BLOCKS = 32    # row blocks of the fused reductions (fixed: thread-count independent)
SCALE_SHIFT = 2.0     # s = sigmoid(raw + 2) (coupling.SCALE_SHIFT)


def use_fused(array):
    """Run the Numba kernels on this array? (NumPy arrays while FUSED is set.)"""
    return FUSED and not is_cupy_array(array)


# ---------------------------------------------------------------- bias + ReLU

@njit(parallel=True, cache=True, error_model="numpy")
def bias_relu_numba(y, bias):
    """y (R, O) = max(y + bias, 0) in place; NaN stays NaN (as x · (x > 0) keeps it)."""
    R, O = y.shape
    for r in prange(R):
        row = y[r]
        for o in range(O):
            v = row[o] + bias[o]
            row[o] = 0 if v <= 0 else v
    return y


@njit(parallel=True, cache=True, error_model="numpy")
def relu_numba(y):
    """y (R, O) = max(y, 0) in place (no bias: the ActNorm form)."""
    R, O = y.shape
    for r in prange(R):
        row = y[r]
        for o in range(O):
            if row[o] <= 0:
                row[o] = 0
    return y


@njit(parallel=True, cache=True, error_model="numpy")
def relu_backward_bias_numba(dy, out):
    """dy (R, O) = dy · (out > 0) in place; returns dy and dbias (O,) = Σ_rows of it."""
    R, O = dy.shape
    blocks = min(R, REDUCE_BLOCKS)
    partial = np.zeros((blocks, O))
    for block in prange(blocks):
        acc = partial[block]
        for r in range(block * R // blocks, (block + 1) * R // blocks):
            g, mask = dy[r], out[r]
            for o in range(O):
                v = g[o] if mask[o] > 0 else 0
                g[o] = v
                acc[o] += v
    return dy, partial.sum(axis=0).astype(dy.dtype)


def bias_relu_numpy(y, bias):
    """The reference: y + bias, then x · (x > 0) (ReLU's plain form), in place."""
    if bias is not None:
        y += bias
    y *= y > 0
    return y


def relu_backward_bias_numpy(dy, out):
    """The reference: dx = dy · (out > 0), dbias = Σ_rows dx."""
    dx = dy * (out > 0)
    return dx, dx.reshape(-1, dx.shape[-1]).sum(axis=0)


def bias_relu(y, bias):
    """max(y + bias, 0) in place on y (B, H, W, O) or (R, O); bias (O,) or None."""
    if not use_fused(y) or not y.flags.c_contiguous:
        return bias_relu_numpy(y, bias)
    rows = y.reshape(-1, y.shape[-1])
    if bias is None:
        relu_numba(rows)
    else:
        bias_relu_numba(rows, np.ascontiguousarray(bias, dtype=y.dtype))
    return y


def relu_backward_bias(dy, out):
    """(dx, dbias): dx = dy · (out > 0) (in place on dy when fused: give a fresh dy), dbias
    (O,) = its sum over every pixel."""
    if not use_fused(dy) or dy.shape != out.shape or not dy.flags.c_contiguous:
        return relu_backward_bias_numpy(dy, out)
    O = dy.shape[-1]
    dx, dbias = relu_backward_bias_numba(dy.reshape(-1, O), np.ascontiguousarray(out).reshape(-1, O))
    return dy, dbias


# ---------------------------------------------------------------- Conv2dZero's scale and bias

@njit(parallel=True, cache=True, error_model="numpy")
def scale_bias_numba(g, bias, e):
    """u = g + bias in place on g (R, O), y = u · e; returns (u, y)."""
    R, O = g.shape
    y = np.empty_like(g)
    for r in prange(R):
        row, out = g[r], y[r]
        for o in range(O):
            u = row[o] + bias[o]
            row[o] = u
            out[o] = u * e[o]
    return g, y


@njit(parallel=True, cache=True, error_model="numpy")
def scale_bias_backward_numba(dy, u, e):
    """du = dy · e (R, O), Σ_rows du · u and Σ_rows du (O,) each."""
    R, O = dy.shape
    du = np.empty_like(dy)
    blocks = min(R, REDUCE_BLOCKS)
    partial = np.zeros((2, blocks, O))
    for block in prange(blocks):
        acc_logs, acc_bias = partial[0, block], partial[1, block]
        for r in range(block * R // blocks, (block + 1) * R // blocks):
            g, ur, dr = dy[r], u[r], du[r]
            for o in range(O):
                v = g[o] * e[o]
                dr[o] = v
                acc_logs[o] += v * ur[o]
                acc_bias[o] += v
    sums = partial.sum(axis=1).astype(dy.dtype)
    return du, sums[0], sums[1]


def scale_bias_numpy(g, bias, e):
    g += bias
    return g, g * e


def scale_bias_backward_numpy(dy, u, e):
    du = dy * e
    O = du.shape[-1]
    return du, (du * u).reshape(-1, O).sum(axis=0), du.reshape(-1, O).sum(axis=0)


def scale_bias(g, bias, e):
    """(u, y): u = g + bias (in place on g, (B, H, W, O)), y = u · e; bias, e (O,)."""
    if not use_fused(g) or not g.flags.c_contiguous:
        return scale_bias_numpy(g, bias, e)
    O = g.shape[-1]
    u, y = scale_bias_numba(g.reshape(-1, O), np.ascontiguousarray(bias, dtype=g.dtype),
                            np.ascontiguousarray(e, dtype=g.dtype))
    return g, y.reshape(g.shape)


def scale_bias_backward(dy, u, e):
    """(du, Σ du·u, Σ du): du = dy · e (B, H, W, O); the sums over every pixel, (O,) each."""
    if not use_fused(dy):
        return scale_bias_backward_numpy(dy, u, e)
    O = dy.shape[-1]
    du, logs_sum, bias_sum = scale_bias_backward_numba(
        np.ascontiguousarray(dy).reshape(-1, O), np.ascontiguousarray(u).reshape(-1, O),
        np.ascontiguousarray(e, dtype=dy.dtype))
    return du.reshape(dy.shape), logs_sum, bias_sum


# ---------------------------------------------------------------- exp and log1p that vectorize
#
# LLVM turns a loop into SIMD code only if every call in it has a vector form; libm's expf and
# log1pf have none (no SVML here), so a loop calling them runs one value at a time. For float32,
# fast_exp and fast_log1p are Cephes's expf / logf polynomials (relative error ~1e-7, checked
# against float64 in tests/test_fused_kernels.py) written with integer operations on the
# exponent bits, which vectorize; float64 keeps libm's math.exp / math.log1p (the twin test
# needs 1e-10 agreement in float64).

def fast_exp(x):
    return math.exp(x)


def fast_log1p(t):
    return math.log1p(t)


@njit(error_model="numpy")
def _exp32(x):
    """expf: x = n·ln2 + r, |r| <= ln2/2 (Cody-Waite, two parts), e^r by Cephes's polynomial,
    2^n put into the exponent bits; x clamped to [-87.3, 88.3] (NaN stays NaN)."""
    x = np.float32(-87.3) if x < np.float32(-87.3) else x
    x = np.float32(88.3) if x > np.float32(88.3) else x
    n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - n * np.float32(0.693359375)
    r = r + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * (r * r) + r + np.float32(1)
    bits = np.int32((np.int32(n) + np.int32(127)) << np.int32(23))
    return p * bits.view(np.float32)


@njit(error_model="numpy")
def _log1p32(t):
    """log1p for t >= 0 (float32): u = 1 + t rounded, log u by Cephes's logf (u = m·2^e,
    m in [sqrt(1/2), sqrt(2))), plus the rounding's correction (t - (u - 1)) / u."""
    one = np.float32(1)
    u = one + t
    bits = np.float32(u).view(np.int32)
    e = (bits >> np.int32(23)) - np.int32(127)
    m = (np.int32((bits & np.int32(0x7FFFFF)) | np.int32(0x3F800000))).view(np.float32)
    big = m > np.float32(1.41421356237)
    m = m * np.float32(0.5) if big else m
    e = e + np.int32(1) if big else e
    f = m - one
    fe = np.float32(e)
    z = f * f
    y = np.float32(7.0376836292e-2)
    y = y * f - np.float32(1.1514610310e-1)
    y = y * f + np.float32(1.1676998740e-1)
    y = y * f - np.float32(1.2420140846e-1)
    y = y * f + np.float32(1.4249322787e-1)
    y = y * f - np.float32(1.6668057665e-1)
    y = y * f + np.float32(2.0000714765e-1)
    y = y * f - np.float32(2.4999993993e-1)
    y = y * f + np.float32(3.3333331174e-1)
    y = y * f * z
    y = y - fe * np.float32(2.12194440e-4)
    y = y - np.float32(0.5) * z
    log_u = f + y + fe * np.float32(0.693359375)
    return log_u + (t - (u - one)) / u


@overload(fast_exp)
def _fast_exp(x):
    if x == types.float32:
        return lambda x: _exp32(x)
    return lambda x: math.exp(x)


@overload(fast_log1p)
def _fast_log1p(t):
    if t == types.float32:
        return lambda t: _log1p32(t)
    return lambda t: math.log1p(t)


@njit(parallel=True, cache=True, error_model="numpy")
def exp_log1p_numba(x, out_exp, out_log1p):
    """fast_exp(x) and fast_log1p(|x|) of every value: what the tests check."""
    for i in prange(x.size):
        out_exp[i] = fast_exp(x[i])
        out_log1p[i] = fast_log1p(abs(x[i]))


# ---------------------------------------------------------------- the affine coupling's passes
#
# h (B, H·W, 2·Cb) channel-last: shift = h[..., :Cb], raw = h[..., Cb:]. The coupling's whole
# tensors x, y, dy, dx (B, C, H·W) channel-first, C-contiguous, their block starting at channel
# lo (passing the whole array keeps every inner loop on contiguous memory, so that it
# vectorizes). The caches shifted, s, slope (B, Cb, H·W). c = [2, bound (0: none), 1, 0] in the
# arrays' dtype (scale_constants), so float32 stays float32. Parallel over the B·Cb planes.

@njit(error_model="numpy", inline="always")
def _softplus_sigmoid(raw, shift, one):
    """(q, s0) = (softplus(-z), sigmoid(z)), z = raw + shift, from one exp and one log1p."""
    z = raw + shift
    t = fast_exp(-abs(z))                   # in (0, 1]: no overflow
    lg = fast_log1p(t)
    pos = z >= 0
    return (lg if pos else lg - z), (one if pos else t) / (one + t)


@njit(error_model="numpy", inline="always")
def _log_scale_bounded(raw, shift, bound, one):
    """(log s, s, slope) with the bound: log s = -bound · tanh(q / bound), q = softplus(-z),
    slope = d log s / d raw = (1 - s0)(1 - tanh²). The scalars shift = 2, bound and one = 1
    come in the arrays' dtype (float32 stays float32)."""
    q, s0 = _softplus_sigmoid(raw, shift, one)
    e2 = fast_exp(-(q / bound) * (one + one))   # tanh(x) = (1 - e^-2x) / (1 + e^-2x), x >= 0
    squashed = (one - e2) / (one + e2)
    log_s = -bound * squashed
    return log_s, fast_exp(log_s), (one - s0) * (one - squashed * squashed)


def scale_constants(dtype, bound):
    """The c argument of the affine kernels: [2, bound (0: none), 1, 0] in ``dtype``."""
    return np.array([SCALE_SHIFT, 0.0 if bound is None else bound, 1.0, 0.0], dtype=dtype)


@njit(error_model="numpy")
def _sum64(values):
    """Σ values in float64, eight partial sums (independent chains: no serial add latency)."""
    acc = np.zeros(8)
    n = values.size
    full = n - n % 8
    for i in range(0, full, 8):
        for k in range(8):
            acc[k] += values[i + k]
    total = 0.0
    for i in range(full, n):
        total += values[i]
    return total + acc.sum()


@njit(error_model="numpy")
def _gather(hn, column):
    """hn[:, column] (H·W,) copied contiguous: the loops that follow vectorize."""
    out = np.empty(hn.shape[0], dtype=hn.dtype)
    for p in range(hn.shape[0]):
        out[p] = hn[p, column]
    return out


@njit(parallel=True, cache=True, error_model="numpy")
def affine_forward_numba(x, lo, h, c, y, shifted, s, slope):
    """y[:, lo:lo+Cb] = (x[:, lo:lo+Cb] + shift) · s; shifted, s (and slope with a bound)
    filled for backward; returns logdet (B,) = Σ log s (summed in float64)."""
    B, HW, Cb = h.shape[0], h.shape[1], h.shape[2] // 2
    shift, bound, one = c[0], c[1], c[2]
    partial = np.zeros(B * Cb)
    for plane in prange(B * Cb):
        n, ch = plane // Cb, plane % Cb
        xr, yr, hn = x[n, lo + ch], y[n, lo + ch], h[n]
        shr, sr, slr = shifted[n, ch], s[n, ch], slope[n, ch]
        raw, log_s = _gather(hn, Cb + ch), np.empty(HW, dtype=h.dtype)
        t = _gather(hn, ch)
        if bound > 0:
            for p in range(HW):
                ls, scale, dlog = _log_scale_bounded(raw[p], shift, bound, one)
                sh = xr[p] + t[p]
                yr[p] = sh * scale
                shr[p] = sh
                sr[p] = scale
                slr[p] = dlog
                log_s[p] = ls
        else:
            for p in range(HW):                 # log s = -q, s = s0 (slope 1 - s: not kept)
                q, scale = _softplus_sigmoid(raw[p], shift, one)
                sh = xr[p] + t[p]
                yr[p] = sh * scale
                shr[p] = sh
                sr[p] = scale
                log_s[p] = -q
        partial[plane] = _sum64(log_s)
    return partial.reshape(B, Cb).sum(axis=1)


@njit(parallel=True, cache=True, error_model="numpy")
def affine_inverse_numba(y, lo, h, c, x):
    """x[:, lo:lo+Cb] = y[:, lo:lo+Cb] / s - shift; 1/s = 1 + exp(-(raw + 2)) without a bound."""
    B, HW, Cb = h.shape[0], h.shape[1], h.shape[2] // 2
    shift, bound, one = c[0], c[1], c[2]
    bounded = bound > 0
    for plane in prange(B * Cb):
        n, ch = plane // Cb, plane % Cb
        xr, yr, hn = x[n, lo + ch], y[n, lo + ch], h[n]
        raw, t = _gather(hn, Cb + ch), _gather(hn, ch)
        if bounded:
            for p in range(HW):
                ls, scale, dlog = _log_scale_bounded(raw[p], shift, bound, one)
                xr[p] = yr[p] * fast_exp(-ls) - t[p]
        else:
            for p in range(HW):
                xr[p] = yr[p] * (one + fast_exp(-(raw[p] + shift))) - t[p]


@njit(parallel=True, cache=True, error_model="numpy")
def affine_backward_numba(dy, lo, dlogdet, shifted, s, slope, use_slope, c, dx):
    """dx[:, lo:lo+Cb] = dy[:, lo:lo+Cb] · s; returns dh (B, H·W, 2·Cb) channel-last:
    [dx block, draw], draw = (dx · shifted + dlogdet) · (slope, or 1 - s)."""
    B, Cb, HW = s.shape
    dh = np.empty((B, HW, 2 * Cb), dtype=s.dtype)
    one = c[2]
    for plane in prange(B * Cb):
        n, ch = plane // Cb, plane % Cb
        dl = dlogdet[n]
        dyr, dxr, dhn = dy[n, lo + ch], dx[n, lo + ch], dh[n]
        shr, sr, slr = shifted[n, ch], s[n, ch], slope[n, ch]
        g, draw = np.empty(HW, dtype=s.dtype), np.empty(HW, dtype=s.dtype)
        for p in range(HW):
            scale = sr[p]
            v = dyr[p] * scale
            dxr[p] = v
            g[p] = v
            draw[p] = (v * shr[p] + dl) * (slr[p] if use_slope else one - scale)
        for p in range(HW):                  # scattered into the channel-last dh
            dhn[p, ch] = g[p]
            dhn[p, Cb + ch] = draw[p]
    return dh
