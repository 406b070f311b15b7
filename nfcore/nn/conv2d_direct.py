"""The direct k×k convolution of channel-last images: the coupling networks' Conv2d without
im2col, a block of outputs accumulated in registers (Numba CPU, float32 and float64).

x (B, H, W, C) -> y (B, H, W, O), stride 1, "same" zero padding p = k // 2, the weight packed
channel-last as w (k, k, C, O_pad)::

    y[n, i, j, o] = sum_{a, b, c} w[a, b, c, o] · x[n, i - p + a, j - p + b, c]
                    (the sum over the taps inside the image; w[a, b, c, o] = weight[o, c, a, b])

O_pad is O rounded up to whole 64-byte rows of output channels (16 float32 / 8 float64 lanes),
w zero beyond O; the kernel writes y (B, H, W, O_pad) and ``conv2d_direct`` returns its first O
channels.

**The register block.** P pixels of one image row (j0 .. j0+P-1) × R 64-byte rows of output
channels (o0 .. o0 + R·NB - 1) are held in registers (a ``cpu_blocked.OuterBlock``) across every
tap and input channel and stored once. Each step (one tap, one input channel c) loads the R
weight rows w[a, b, c, o0 : o0 + R·NB] once and fuse-multiplies them, times each pixel's
broadcast value x[n, i-p+a, j-p+b, c], into the P·R accumulators (``grid_fma``): R + P loads
for P·R fused multiply-adds, the shape of a GEMM micro-kernel. With AVX-512 (32 registers) a
block holds up to 24 accumulators (R = 4 rows × P = 6 pixels, 2 × 12, 1 × 16), with AVX2 (16)
up to 12 of 32 bytes; the rows are that wide there too. That is the masked convolution's block
(nfcore/kernels/cpu_blocked.py) with the roles of image and weight exchanged: there the vector
runs over images (batch-last layout), here over output channels (channel-last, the coupling
networks' layout), so no conversion is needed.

**The edges.** Each task (one image) first copies its image into a zero-bordered scratch
(H + 2p, W + 2p, C): every pixel then has all k×k taps, and a block may span any pixels of a
row (the row's W pixels go in blocks of the largest P that fits, then smaller ones).
Every output gets the same operations in the same order (the taps (a, b) in order, the input
channels in order, fused, from zero; the border's zeros included) whatever block or thread
computes it, so the result does not depend on the number of threads or on which other images
are in the batch.

The input gradient is the same convolution (``conv2d_direct_input_grad``): with
w'[a, b, o, c] = weight[o, c, k-1-a, k-1-b],

    dx[n, i, j, c] = sum_{a, b, o} w'[a, b, o, c] · dy[n, i - p + a, j - p + b, o].

The weight gradient stays a matrix product (nfcore/nn/conv2d.py): it sums over the B·H·W
pixels, the shape a GEMM handles best. The reference of these kernels is that file's im2col
convolution; tests/test_conv2d_direct.py checks them against it and against a dense loop.
"""
import numpy as np
from numba import njit, prange

from ..kernels.cpu_blocked import _host_has_avx512, grid_fma, outer_store, outer_zeros

AVX512 = _host_has_avx512()
ROW_BYTES = 64 if AVX512 else 32     # one row of output channels: 16 / 8 float32 lanes


def padded_channels(n_channels, itemsize):
    """n_channels rounded up to whole ROW_BYTES rows of lanes."""
    lanes = ROW_BYTES // itemsize
    return -(-n_channels // lanes) * lanes


def fills_its_rows(n_channels, itemsize):
    """True when ``n_channels`` output channels fill the direct kernel's SIMD rows: whole rows
    of lanes, or a single row at least 3/4 full (12 of 16 float32 lanes: the last conv of a
    6-channel coupling)."""
    lanes = ROW_BYTES // itemsize
    return n_channels % lanes == 0 or (n_channels < lanes and 4 * n_channels >= 3 * lanes)


def method(n_in, n_out, itemsize):
    """Which kernel computes a k×k convolution (k > 1) from n_in to n_out channels:

    "direct"       ``conv2d_direct``: n_out fills its rows, and n_in is not far wider
                   (n_in < 8·n_out, or n_in <= n_out);
    "output_side"  ``conv2d_direct_output_side``: n_in > n_out otherwise (narrow or much
                   narrower outputs: the k·k·n_out products of a pixel fill the rows);
    None           the im2col products (n_in <= n_out and n_out narrow).

    Measured on the 2-core AVX-512 machine (forward, ms, im2col / direct / output side):
    one thread, 101 images: 64->12 16² 6.17 / 5.19 / 5.32, 64->24 8² 2.25 / 2.43 / 2.08,
    64->48 4² 1.04 / 0.92 / 1.01, 512->12 16² 38.8 / 40.2 / 31.8, 512->48 4² 8.43 / 10.4 / 7.62;
    two threads, 16 images: 512->12 16² 3.48 / 3.42 / 2.87, 512->24 8² 1.89 / 2.26 / 1.77. The
    input gradient is the same choice with the roles exchanged (n_out -> n_in): the coupling
    networks' first conv (6 -> 64) gets its dx by the output side in 1.32 ms against 1.80 ms for
    the GEMM and col2im (two threads, 64 images, 16²)."""
    if fills_its_rows(n_out, itemsize) and (n_in <= n_out or n_in < 8 * n_out):
        return "direct"
    if n_in > n_out:
        return "output_side"
    return None


def pack_weight(weight, dtype):
    """w (k, k, C, O_pad) of ``dtype`` from weight (O, C, k, k): w[a, b, c, o] = weight[o, c, a, b],
    zero for o >= O."""
    O, C, k, _ = weight.shape
    w = np.zeros((k, k, C, padded_channels(O, np.dtype(dtype).itemsize)), dtype=dtype)
    w[..., :O] = weight.transpose(2, 3, 1, 0)
    return w


def pack_weight_for_input_grad(weight, dtype):
    """w' (k, k, O, C_pad): w'[a, b, o, c] = weight[o, c, k-1-a, k-1-b], zero for c >= C."""
    return pack_weight(weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3), dtype)


@njit(cache=True)
def _conv_block(y, xs, w, n, i, j0, o0, acc):
    """y[n, i, j0 : j0+P, o0 : o0 + R·NB] from the zero-bordered image xs (H+2p, W+2p, C), one
    store. ``acc``: an OuterBlock of zeros (its type gives P, R and NB)."""
    Ws, C = xs.shape[1], xs.shape[2]
    k, O_pad = w.shape[0], w.shape[3]
    H, W = y.shape[1], y.shape[2]
    lanes = ROW_BYTES // xs.itemsize
    for a in range(k):
        for b in range(k):
            x_at = ((i + a) * Ws + j0 + b) * C
            w_at = ((a * k + b) * C) * O_pad + o0
            for c in range(C):
                acc = grid_fma(acc, xs, x_at + c, C, w, w_at + c * O_pad)
    outer_store(acc, y, ((n * H + i) * W + j0) * O_pad + o0, O_pad, lanes)


@njit(inline="always")
def _pixels_of_4_rows(y, xs, w, n, i, j0, o0, left):
    """A block of 4 rows of channels: P = 6, 4, 3, 2 or 1 pixels (the most of them <= ``left``);
    returns P. With 32-byte rows (AVX2), 3, 2 or 1 pixels."""
    if AVX512 and left >= 6:
        _conv_block(y, xs, w, n, i, j0, o0, outer_zeros(xs, 6, 4, ROW_BYTES))
        return 6
    if AVX512 and left >= 4:
        _conv_block(y, xs, w, n, i, j0, o0, outer_zeros(xs, 4, 4, ROW_BYTES))
        return 4
    if left >= 3:
        _conv_block(y, xs, w, n, i, j0, o0, outer_zeros(xs, 3, 4, ROW_BYTES))
        return 3
    if left >= 2:
        _conv_block(y, xs, w, n, i, j0, o0, outer_zeros(xs, 2, 4, ROW_BYTES))
        return 2
    _conv_block(y, xs, w, n, i, j0, o0, outer_zeros(xs, 1, 4, ROW_BYTES))
    return 1


@njit(inline="always")
def _pixels_of_2_rows(y, xs, w, n, i, j0, o0, left):
    """A block of 2 rows: P = 12, 8, 4, 2 or 1 pixels (AVX2: 6, 4, 2, 1); returns P."""
    if AVX512 and left >= 12:
        _conv_block(y, xs, w, n, i, j0, o0, outer_zeros(xs, 12, 2, ROW_BYTES))
        return 12
    if AVX512 and left >= 8:
        _conv_block(y, xs, w, n, i, j0, o0, outer_zeros(xs, 8, 2, ROW_BYTES))
        return 8
    if left >= 6:
        _conv_block(y, xs, w, n, i, j0, o0, outer_zeros(xs, 6, 2, ROW_BYTES))
        return 6
    if left >= 4:
        _conv_block(y, xs, w, n, i, j0, o0, outer_zeros(xs, 4, 2, ROW_BYTES))
        return 4
    if left >= 2:
        _conv_block(y, xs, w, n, i, j0, o0, outer_zeros(xs, 2, 2, ROW_BYTES))
        return 2
    _conv_block(y, xs, w, n, i, j0, o0, outer_zeros(xs, 1, 2, ROW_BYTES))
    return 1


@njit(inline="always")
def _pixels_of_1_row(y, xs, w, n, i, j0, o0, left):
    """A block of 1 row: P = 16, 12, 8, 4, 2 or 1 pixels (AVX2: 12, 8, 4, 2, 1); returns P."""
    if AVX512 and left >= 16:
        _conv_block(y, xs, w, n, i, j0, o0, outer_zeros(xs, 16, 1, ROW_BYTES))
        return 16
    if left >= 12:
        _conv_block(y, xs, w, n, i, j0, o0, outer_zeros(xs, 12, 1, ROW_BYTES))
        return 12
    if left >= 8:
        _conv_block(y, xs, w, n, i, j0, o0, outer_zeros(xs, 8, 1, ROW_BYTES))
        return 8
    if left >= 4:
        _conv_block(y, xs, w, n, i, j0, o0, outer_zeros(xs, 4, 1, ROW_BYTES))
        return 4
    if left >= 2:
        _conv_block(y, xs, w, n, i, j0, o0, outer_zeros(xs, 2, 1, ROW_BYTES))
        return 2
    _conv_block(y, xs, w, n, i, j0, o0, outer_zeros(xs, 1, 1, ROW_BYTES))
    return 1


@njit(cache=True)
def _conv_rows(y, xs, w, n):
    """Every row of y[n] from the zero-bordered image xs: the output channels in blocks of 4
    rows (then 2, 1), the pixels of each in blocks as wide as fit."""
    H, W = y.shape[1], y.shape[2]
    lanes = ROW_BYTES // xs.itemsize
    n_rows = w.shape[3] // lanes
    for i in range(H):
        row = 0
        while row < n_rows:
            R = 4 if n_rows - row >= 4 else (2 if n_rows - row >= 2 else 1)
            j = 0
            while j < W:
                if R == 4:
                    j += _pixels_of_4_rows(y, xs, w, n, i, j, row * lanes, W - j)
                elif R == 2:
                    j += _pixels_of_2_rows(y, xs, w, n, i, j, row * lanes, W - j)
                else:
                    j += _pixels_of_1_row(y, xs, w, n, i, j, row * lanes, W - j)
            row += R


@njit(cache=True)
def _conv_image(y, x, w, n, xs):
    """Image n: copied into the zero-bordered scratch xs, then every row (``_conv_rows``)."""
    _, H, W, _ = x.shape
    p = w.shape[0] // 2
    xs[:] = 0
    xs[p:p + H, p:p + W, :] = x[n]
    _conv_rows(y, xs, w, n)


@njit(parallel=True, cache=True)
def conv_forward(x, w):
    """y (B, H, W, O_pad) from C-contiguous x (B, H, W, C) and w (k, k, C, O_pad) of x's dtype;
    parallel over the images."""
    B, H, W, C = x.shape
    p = w.shape[0] // 2
    y = np.empty((B, H, W, w.shape[3]), dtype=x.dtype)
    for n in prange(B):
        xs = np.empty((H + 2 * p, W + 2 * p, C), dtype=x.dtype)
        _conv_image(y, x, w, n, xs)
    return y


@njit(parallel=True, cache=True)
def conv_forward_output_side(x, v, k, n_out):
    """y (B, H, W, n_out) from C-contiguous x (B, H, W, C) and v (1, 1, C, Z_pad), v[0, 0, c,
    (a, b, o)] = weight[o, c, k-1-a, k-1-b] (zero beyond k·k·n_out); parallel over the images.
    Image by image: z = x[n] @ v by the register blocks (a 1×1 convolution into a scratch of
    H·W·Z_pad values, which stays in cache), then y[n, i, j, o] = sum over the taps (a, b), in
    order, of z[i+p-a, j+p-b, (a, b, o)] (col2im's gather)."""
    B, H, W, C = x.shape
    p = k // 2
    y = np.empty((B, H, W, n_out), dtype=x.dtype)
    for n in prange(B):
        z = np.empty((1, H, W, v.shape[3]), dtype=x.dtype)
        _conv_rows(z, x[n], v, 0)
        _gather_taps(y[n], z[0], k)
    return y


@njit(cache=True)
def _gather_taps(y, z, k):
    """y[i, j, o] = sum over the taps (a, b) inside the image, in order, of
    z[i+p-a, j+p-b, (a, b, o)]; y (H, W, O), z (H, W, ≥ k·k·O)."""
    H, W, n_out = y.shape
    p = k // 2
    y[:] = 0
    for a in range(k):
        for b in range(k):
            first = (a * k + b) * n_out
            for i in range(max(0, a - p), min(H, H + a - p)):
                for j in range(max(0, b - p), min(W, W + b - p)):
                    source = z[i + p - a, j + p - b]
                    target = y[i, j]
                    for o in range(n_out):
                        target[o] += source[first + o]


def _first_channels(y, n_channels):
    return y if y.shape[3] == n_channels else np.ascontiguousarray(y[..., :n_channels])


def conv2d_direct(x, weight):
    """y (B, H, W, O), the convolution of x (B, H, W, C) (NumPy, float32 or float64) with
    weight (O, C, k, k), k odd, without bias."""
    w = pack_weight(weight, x.dtype)
    return _first_channels(conv_forward(np.ascontiguousarray(x), w), weight.shape[0])


def conv2d_direct_output_side(x, weight):
    """y (B, H, W, O), the convolution of x (B, H, W, C) with weight (O, C, k, k) without bias,
    as ``conv_forward_output_side`` computes it: for narrow outputs (C > O), whose k·k·O
    products per pixel fill the SIMD rows that O alone would not."""
    O, C, k, _ = weight.shape
    # V (C, k·k·O), V[c, (a, b, o)] = weight[o, c, k-1-a, k-1-b], packed as a 1×1 convolution
    V = weight[:, :, ::-1, ::-1].transpose(1, 2, 3, 0).reshape(C, k * k * O)
    v = pack_weight(V.T[:, :, None, None], x.dtype)
    return conv_forward_output_side(np.ascontiguousarray(x), v, k, O)


def conv2d_direct_input_grad(dy, weight):
    """dx (B, H, W, C) of the convolution with weight (O, C, k, k), from dy (B, H, W, O)."""
    w = pack_weight_for_input_grad(weight, dy.dtype)
    return _first_channels(conv_forward(np.ascontiguousarray(dy), w), weight.shape[1])


def conv2d_direct_output_side_input_grad(dy, weight):
    """``conv2d_direct_input_grad`` by the output side: the convolution of dy with
    w'[c, o, a, b] = weight[o, c, k-1-a, k-1-b] (for a narrow input, C < O)."""
    return conv2d_direct_output_side(dy, weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
