"""Numba CPU kernels of the masked k×k convolution in its top-left form.

Every array here is grouped and **batch-last**, so that one kernel serves InvConv (G = 1) and
the FInC unit (G = 4 quarters, each already flipped into the top-left form)::

    x, y  : (G, H, W, C, B)     images: for each pixel, a (C, B) block, the batch contiguous
    w     : (G, k, k, C, C)     w[g, a, b, ci, co], the effective (masked) weight

The top-left convolution, zero padding on the top and the left::

    y[g, i, j, co, n] = sum_{a, b, ci} w[g, a, b, ci, co] * x[g, i-(k-1)+a, j-(k-1)+b, ci, n]

The tap a = b = k-1 couples a pixel to itself; its C×C block L[co, ci] = w[g, k-1, k-1, ci, co]
is lower triangular (nonzero only for co >= ci) with a nonzero diagonal, so the whole Jacobian is
triangular when pixels are ordered by i + j, and the inverse is solved one anti-diagonal at a
time (pixels with equal i + j do not depend on each other).

**Why batch-last.** The innermost loop of every kernel runs over the batch: one weight times a
row of B images, added into a row of B outputs. Every SIMD lane is useful whatever the channel
count (the FInC unit's quarters have 3 channels at CIFAR's first level, where a loop over
channels would fill 3 of 8 lanes) and whatever the image size (4×4 at the last level). The
images of a batch are independent in the inverse too, so the triangular solve runs on whole
rows of B as well. ``_add_taps`` feeds four output channels from each row of x it loads (one
load, four fused multiply-adds), which keeps the loop near the machine's store throughput.

The plain NumPy versions of all of these, in the (G, B, H, W, C) layout of the CUDA kernels,
are in ``numpy_ref.py``; the tests hold each kernel here to its reference there.

Threads. ``conv_forward`` runs rows in parallel. The inverse (``wavefront_inverse``) has two
schedules: when the (group, batch chunk) pairs fill the threads, each thread solves its own
chunk of images pixel after pixel with no synchronization at all (``sweep_inverse``: a thread
gains nothing from the anti-diagonal order, and a thread that the OS deschedules delays only
itself); for a batch too small for that, the anti-diagonal sweep (``diagonal_inverse``)
spreads every diagonal's pixels over the threads, with a barrier per diagonal: H+W-1 parallel
steps. The weight gradient sums fixed chunks of the batch in a fixed order, so its rounding
does not depend on the number of threads.

**Plain and register-blocked kernels.** The kernels written out below (``conv_forward_plain``,
``sweep_inverse_plain``, ``diagonal_inverse_plain``, ``wavefront_inverse_plain``, and the
weight gradient) add every product into memory: one load and one store of a row of outputs per
fused multiply-add. ``cpu_blocked.py`` has the register-blocked forward and inverse (a block of
up to 6 output channels × 64 bytes of images accumulated in registers over all taps and input
channels, stored once; its docstring). The public names, which the layers call, are the blocked
ones: ``conv_forward``, ``conv_input_grad`` (which runs ``conv_forward``), ``sweep_inverse``,
``diagonal_inverse``, ``wavefront_inverse``, ``raster_inverse``. The plain ones stay as their
reference; the tests hold both to ``numpy_ref.py`` and to each other.
"""
import numba
import numpy as np
from numba import njit, prange

from . import cpu_blocked, input_grad_by_flips

# The kernels' axis order as a transpose of the canonical (G, B, H, W, C): (G, H, W, C, B).
AXES = (0, 2, 3, 4, 1)
MIN_SWEEP_LANES = 16  # fewest images per thread in the plain per-thread inverse
MIN_BLOCKED_SWEEP_LANES = 8   # ... in the register-blocked one (a row of 8 is a whole register)
DIAGONAL_MIN_FLOPS = 4e6      # average work per anti-diagonal below which the blocked inverse
                              # sweeps on one thread rather than pay a barrier per diagonal
LANES = 8            # float32 lanes of an AVX2 register: the batch axis is padded to a multiple
LANE_CHUNK = 32      # images per chunk of the weight gradient (fixed: rounding independent of threads)


# ---- layout: (B, C, H, W) <-> (G, H, W, Cg, B) ------------------------------------------------

def padded_batch(B):
    """The batch axis's length in the kernels' layout: B rounded up to a multiple of LANES
    (B itself below LANES). The inner loops over a row of images then run in whole SIMD
    registers: with a remainder of one to seven images LLVM finishes each row one image at
    a time, and a batch of 65 or 66 took 1.3-1.6× as long per image as one of 64 or 72
    (forward and inverse, FInC and InvConv shapes). The padding images are zeros, which
    every kernel maps to zeros (the inverse too: y = 0 gives x = 0)."""
    return B if B < LANES else -(-B // LANES) * LANES


def to_groups(x, flips):
    """(B, C, H, W) -> (G, H, W, Cg, padded_batch(B)), G = len(flips) groups of Cg = C / G
    channels; group g's rows are reversed when flips[g, 0], its columns when flips[g, 1] (its
    top-left form) and its channels when flips[g, 2] (its lower-triangular self-tap); the
    padding images are zeros. float32 and float64 by register-transposed tiles
    (``cpu_blocked.to_groups``, 10-20× faster than element by element); other dtypes by
    ``to_groups_plain``."""
    if x.dtype not in (np.float32, np.float64):
        return to_groups_plain(x, flips)
    return cpu_blocked.to_groups(np.ascontiguousarray(x), flips, padded_batch(x.shape[0]))


def to_groups_plain(x, flips):
    """``to_groups`` element by element (the reference of the tiled one)."""
    return _to_groups(x, flips, padded_batch(x.shape[0]))


@njit(parallel=True, cache=True)
def _to_groups(x, flips, B_padded):
    """``to_groups``, parallel over (channel, row); each task reads whole rows of x."""
    B, C, H, W = x.shape
    G = flips.shape[0]
    Cg = C // G
    out = np.empty((G, H, W, Cg, B_padded), dtype=x.dtype)
    for t in prange(C * H):
        g = t // (Cg * H)
        c = (t // H) % Cg
        i = t % H
        i_source = H - 1 - i if flips[g, 0] else i
        c_source = Cg - 1 - c if flips[g, 2] else c
        for n in range(B):
            row = x[n, g * Cg + c_source, i_source]
            for j in range(W):
                j_source = W - 1 - j if flips[g, 1] else j
                out[g, i, j, c, n] = row[j_source]
        for j in range(W):
            for n in range(B, B_padded):
                out[g, i, j, c, n] = 0
    return out


def from_groups(xg, flips, n_images):
    """The inverse of ``to_groups``: (G, H, W, Cg, B_padded) -> (n_images, G·Cg, H, W), the
    padding images dropped. float32 and float64 by tiles (``cpu_blocked.from_groups``)."""
    if xg.dtype not in (np.float32, np.float64):
        return from_groups_plain(xg, flips, n_images)
    return cpu_blocked.from_groups(np.ascontiguousarray(xg), flips, n_images)


@njit(parallel=True, cache=True)
def from_groups_plain(xg, flips, n_images):
    """``from_groups`` element by element (the reference of the tiled one)."""
    G, H, W, Cg, _ = xg.shape
    out = np.empty((n_images, G * Cg, H, W), dtype=xg.dtype)
    for t in prange(G * Cg * H):
        g = t // (Cg * H)
        c = (t // H) % Cg
        i = t % H
        i_source = H - 1 - i if flips[g, 0] else i
        c_source = Cg - 1 - c if flips[g, 2] else c
        for n in range(n_images):
            row = out[n, g * Cg + c, i]
            for j in range(W):
                j_source = W - 1 - j if flips[g, 1] else j
                row[j] = xg[g, i_source, j_source, c_source, n]
    return out


# ---- the masked convolution ----------------------------------------------------------------

@njit(inline="always")
def _add_taps(out, x, w, g, i, j, n0, n1, include_self):
    """out[co, n] += sum over taps of w[g, a, b, ci, co] * x[g, i-(k-1)+a, j-(k-1)+b, ci, n],
    for the images n0 <= n < n1. ``out`` is one pixel's (C_out, B) block.

    With ``include_self`` False the self-tap (k-1, k-1) is left out (the inverse's right side).
    Output channels go four at a time (``_add_taps_four``); a remainder of three goes in one
    pass (``_add_taps_three``: the FInC unit's quarters have 3 channels at CIFAR's first level,
    and three passes of one took 1.7× as long), a remainder of one or two one at a time.
    """
    C_out = w.shape[4]
    for co in range(0, C_out - 3, 4):
        _add_taps_four(out, x, w, g, i, j, n0, n1, include_self, co)
    if C_out % 4 == 3:
        _add_taps_three(out, x, w, g, i, j, n0, n1, include_self, C_out - 3)
    else:
        for co in range(C_out - C_out % 4, C_out):
            _add_taps_one(out, x, w, g, i, j, n0, n1, include_self, co)


@njit(inline="always")
def _add_taps_three(out, x, w, g, i, j, n0, n1, include_self, co):
    """``_add_taps_four`` for the three output channels co .. co+2."""
    k = w.shape[1]
    lanes = n1 - n0
    out0, out1, out2 = out[co, n0:n1], out[co + 1, n0:n1], out[co + 2, n0:n1]
    for a in range(max(0, k - 1 - i), k):
        ii = i - (k - 1) + a
        for b in range(max(0, k - 1 - j), k):
            if not include_self and a == k - 1 and b == k - 1:
                continue
            jj = j - (k - 1) + b
            for ci in range(w.shape[3]):
                x_row = x[g, ii, jj, ci, n0:n1]
                w0, w1, w2 = w[g, a, b, ci, co], w[g, a, b, ci, co + 1], w[g, a, b, ci, co + 2]
                for n in range(lanes):
                    xv = x_row[n]
                    out0[n] += w0 * xv
                    out1[n] += w1 * xv
                    out2[n] += w2 * xv


@njit(inline="always")
def _add_taps_four(out, x, w, g, i, j, n0, n1, include_self, co):
    """``_add_taps`` for the output channels co .. co+3: each row x[.., ci, n0:n1] loaded
    feeds four fused multiply-adds. Every inner loop runs over rows sliced to n0:n1 from
    index 0: with a loop starting at a run-time n0, Numba cannot tell the index is never
    negative, and LLVM does not vectorize it."""
    k = w.shape[1]
    lanes = n1 - n0
    out0, out1 = out[co, n0:n1], out[co + 1, n0:n1]
    out2, out3 = out[co + 2, n0:n1], out[co + 3, n0:n1]
    for a in range(max(0, k - 1 - i), k):
        ii = i - (k - 1) + a
        for b in range(max(0, k - 1 - j), k):
            if not include_self and a == k - 1 and b == k - 1:
                continue
            jj = j - (k - 1) + b
            for ci in range(w.shape[3]):
                x_row = x[g, ii, jj, ci, n0:n1]
                w0, w1 = w[g, a, b, ci, co], w[g, a, b, ci, co + 1]
                w2, w3 = w[g, a, b, ci, co + 2], w[g, a, b, ci, co + 3]
                for n in range(lanes):
                    xv = x_row[n]
                    out0[n] += w0 * xv
                    out1[n] += w1 * xv
                    out2[n] += w2 * xv
                    out3[n] += w3 * xv


@njit(inline="always")
def _add_taps_one(out, x, w, g, i, j, n0, n1, include_self, co):
    """``_add_taps`` for the one output channel co."""
    k = w.shape[1]
    lanes = n1 - n0
    out_row = out[co, n0:n1]
    for a in range(max(0, k - 1 - i), k):
        ii = i - (k - 1) + a
        for b in range(max(0, k - 1 - j), k):
            if not include_self and a == k - 1 and b == k - 1:
                continue
            jj = j - (k - 1) + b
            for ci in range(w.shape[3]):
                x_row = x[g, ii, jj, ci, n0:n1]
                wv = w[g, a, b, ci, co]
                for n in range(lanes):
                    out_row[n] += wv * x_row[n]


@njit(inline="always")
def _solve_pixel(x, y, w, g, i, j, n0, n1):
    """Solve pixel (i, j) of x for the images n0 <= n < n1, all pixels it depends on being
    solved already and x[g, i, j] still zero.

    r = y[i, j] - (all taps but the self-tap applied to x), then forward substitution through
    the lower-triangular self-tap L[co, ci] = w[g, k-1, k-1, ci, co]:
    x[c] = (r[c] - sum_{c' < c} L[c, c'] x[c']) / L[c, c], in place in x, a row of images at a time.
    """
    k = w.shape[1]
    C = x.shape[3]
    lanes = n1 - n0
    r = x[g, i, j]                      # (C, B), a view: the pixel being solved, in place
    _add_taps(r, x, w, g, i, j, n0, n1, False)
    for c in range(C):
        y_row, r_row = y[g, i, j, c, n0:n1], r[c, n0:n1]
        for n in range(lanes):
            r_row[n] = y_row[n] - r_row[n]
    for ci in range(C):
        diagonal = w[g, k - 1, k - 1, ci, ci]
        solved = r[ci, n0:n1]
        for n in range(lanes):
            solved[n] = solved[n] / diagonal
        for co in range(ci + 1, C):
            lower = w[g, k - 1, k - 1, ci, co]
            r_row = r[co, n0:n1]
            for n in range(lanes):
                r_row[n] -= lower * solved[n]


@njit(parallel=True, cache=True)
def conv_forward_plain(x, w):
    """y = the top-left masked convolution of x with w. Parallel over (group, row)."""
    G, H, W, _, B = x.shape
    y = np.zeros((G, H, W, w.shape[4], B), dtype=x.dtype)
    for t in prange(G * H):
        g = t // H
        i = t % H
        for j in range(W):
            _add_taps(y[g, i, j], x, w, g, i, j, 0, B, True)
    return y


@njit(parallel=True, cache=True)
def _sweep_plain(y, w, n_chunks):
    G, H, W, _, B = y.shape
    x = np.zeros_like(y)
    chunk = -(-B // n_chunks)
    chunk = -(-chunk // LANES) * LANES     # whole registers in every chunk but the last
    for t in prange(G * n_chunks):
        g = t // n_chunks
        n0 = (t % n_chunks) * chunk
        n1 = min(B, n0 + chunk)
        for i in range(H):
            for j in range(W):
                _solve_pixel(x, y, w, g, i, j, n0, n1)
    return x


def _sweep_chunks(G, B, min_lanes=MIN_SWEEP_LANES):
    """Image chunks per group for the per-thread sweep: enough for every thread to have a
    (group, chunk) piece, none under ``min_lanes`` images (the plain kernels' short rows
    vectorize poorly; the blocked ones take rows of 8, one register, at full speed)."""
    wanted = -(-numba.get_num_threads() // G)
    return max(1, min(wanted, B // min_lanes))


def sweep_inverse_plain(y, w):
    """x such that conv_forward(x, w) == y: each thread solves its own (group, chunk of
    images) pixel after pixel in raster order, with no synchronization: H·W steps per thread."""
    return _sweep_plain(y, w, _sweep_chunks(y.shape[0], y.shape[4]))


def raster_inverse_plain(y, w):
    """The raster-scan solve, pixel after pixel (Emerging's published way: H·W sequential
    steps, parallel only over groups and images). On the CPU this is the same schedule as
    ``sweep_inverse``: one thread gains nothing from another order of the same pixels."""
    return _sweep_plain(y, w, _sweep_chunks(y.shape[0], y.shape[4]))


@njit(parallel=True, cache=True)
def diagonal_inverse_plain(y, w):
    """x such that conv_forward(x, w) == y, solved anti-diagonal by anti-diagonal.

    For d = 0 .. H+W-2 (sequential), every pixel with i + j = d in every group is solved in
    parallel (all images at once): H+W-1 parallel steps, each ending at a barrier.
    """
    G, H, W, _, B = y.shape
    x = np.zeros_like(y)
    for d in range(H + W - 1):
        i_first = max(0, d - (W - 1))
        n_pixels = min(H - 1, d) - i_first + 1
        for t in prange(G * n_pixels):
            g = t // n_pixels
            i = i_first + t % n_pixels
            _solve_pixel(x, y, w, g, i, d - i, 0, B)
    return x


def _fills_threads(G, B, min_lanes=MIN_SWEEP_LANES):
    """Do the per-thread sweep's (group, image chunk) pieces fill the threads?"""
    return G * _sweep_chunks(G, B, min_lanes) >= numba.get_num_threads()


def wavefront_inverse_plain(y, w):
    """x such that conv_forward(x, w) == y, with the schedule that suits the batch: the
    per-thread sweep when the (group, image chunk) pieces fill the threads, else the
    anti-diagonal sweep (see the module docstring)."""
    if _fills_threads(y.shape[0], y.shape[4]):
        return sweep_inverse_plain(y, w)
    return diagonal_inverse_plain(y, w)


@njit(parallel=True, cache=True)
def _weight_grad_partials(x, dy, k):
    """partial[g, a, b, chunk, ci, co, n] = sum_{i, j} x[g, i', j', ci, n] * dy[g, i, j, co, n]
    for the images n of one chunk; parallel over (group, tap, chunk)."""
    G, H, W, C_in, B = x.shape
    C_out = dy.shape[3]
    chunk = min(B, LANE_CHUNK)
    n_chunks = -(-B // chunk)
    partial = np.zeros((G, k, k, n_chunks, C_in, C_out, chunk), dtype=x.dtype)
    for t in prange(G * k * k * n_chunks):
        g = t // (k * k * n_chunks)
        a = (t // (k * n_chunks)) % k
        b = (t // n_chunks) % k
        c = t % n_chunks
        n0 = c * chunk
        n1 = min(B, n0 + chunk)
        acc = partial[g, a, b, c]
        for i in range(k - 1 - a, H):
            ii = i - (k - 1) + a
            for j in range(k - 1 - b, W):
                jj = j - (k - 1) + b
                for ci in range(C_in):
                    x_row = x[g, ii, jj, ci, n0:n1]
                    for co in range(C_out):
                        dy_row = dy[g, i, j, co, n0:n1]
                        acc_row = acc[ci, co]
                        for n in range(n1 - n0):
                            acc_row[n] += x_row[n] * dy_row[n]
    return partial


def conv_weight_grad_plain(x, dy, k):
    """dw[g, a, b, ci, co] = sum_{n, i, j} x[g, i-(k-1)+a, j-(k-1)+b, ci, n] * dy[g, i, j, co, n].

    Sums over pixels for each image lane and chunk of LANE_CHUNK images (vectorized over
    the images), then over the lanes and chunks in a fixed order: deterministic, whatever the
    number of threads. Returns (G, k, k, C_in, C_out).
    """
    partial = _weight_grad_partials(x, dy, int(k))
    return partial.sum(axis=(3, 6))


def conv_weight_grad(x, dy, k):
    """``conv_weight_grad_plain`` with register blocks (``cpu_blocked.weight_grad_partials``:
    3×3 (input, output) channel blocks of one register of images summed over tiles of pixels
    in registers): per-lane sums over the pixels of bands of OUTER_BAND rows in raster order,
    then over the bands, chunks of LANE_CHUNK images and lanes in a fixed order, so
    deterministic whatever the number of threads. A batch not a multiple of LANES is padded
    with zero images (which add nothing)."""
    if not (_blockable(x, dy) and x.dtype == dy.dtype):
        return conv_weight_grad_plain(x, dy, k)
    xb, dyb = _in_whole_rows(x), _in_whole_rows(dy)
    partial = cpu_blocked.weight_grad_partials(xb, dyb, int(k), min(xb.shape[-1], LANE_CHUNK))
    return cpu_blocked.sum_partials(partial)


def conv_input_grad(dy, w):
    """dx = the gradient of conv_forward with respect to x: see ``input_grad_by_flips``."""
    return input_grad_by_flips(conv_forward, dy, w, AXES)


def conv_input_grad_plain(dy, w):
    """``conv_input_grad`` by the plain forward kernel."""
    return input_grad_by_flips(conv_forward_plain, dy, w, AXES)


# ---- the register-blocked kernels (cpu_blocked.py), the ones the layers call ---------------

def _blockable(a, w):
    """Can the blocked kernels take a (float32 or float64, w of the same dtype)?"""
    return a.dtype in (np.float32, np.float64) and w.dtype == a.dtype


def _in_whole_rows(a):
    """a, C-contiguous, its batch axis (the last) a multiple of LANES: zero images appended
    where it is not (a batch under 8, or an array that did not come from ``to_groups``).
    Zero images give zeros, and every image gets the same operations wherever it is."""
    B = a.shape[-1]
    if B % LANES == 0:
        return np.ascontiguousarray(a)
    padded = np.zeros(a.shape[:-1] + (-(-B // LANES) * LANES,), dtype=a.dtype)
    padded[..., :B] = a
    return padded


def _first_images(a, B):
    """a without the images ``_in_whole_rows`` appended."""
    return a if a.shape[-1] == B else np.ascontiguousarray(a[..., :B])


def conv_forward(x, w):
    """y = the top-left masked convolution of x with w: the register-blocked kernel
    (``cpu_blocked.conv_forward``), parallel over (group, row). Other dtypes than float32 and
    float64 (or a w of another dtype than x) go to ``conv_forward_plain``."""
    if not _blockable(x, w):
        return conv_forward_plain(x, w)
    return _first_images(cpu_blocked.conv_forward(_in_whole_rows(x), np.ascontiguousarray(w)),
                         x.shape[-1])


def _sweep_chunk(G, B):
    """Images per chunk of the blocked per-thread sweep: B split into ``_sweep_chunks`` chunks
    (none under MIN_BLOCKED_SWEEP_LANES images), each rounded up to whole registers (LANES)."""
    chunk = -(-B // _sweep_chunks(G, B, MIN_BLOCKED_SWEEP_LANES))
    return -(-chunk // LANES) * LANES


def sweep_inverse(y, w):
    """x such that conv_forward(x, w) == y: the per-thread sweep (``sweep_inverse_plain``'s
    schedule) with the register-blocked solve of ``cpu_blocked``."""
    if not _blockable(y, w):
        return sweep_inverse_plain(y, w)
    yb = _in_whole_rows(y)
    x = cpu_blocked.sweep(yb, np.ascontiguousarray(w), _sweep_chunk(y.shape[0], yb.shape[-1]))
    return _first_images(x, y.shape[-1])


def raster_inverse(y, w):
    """The raster-scan solve: on the CPU the per-thread sweep (see ``raster_inverse_plain``)."""
    return sweep_inverse(y, w)


def diagonal_inverse(y, w):
    """x such that conv_forward(x, w) == y, anti-diagonal by anti-diagonal (``diagonal_inverse_
    plain``'s schedule) with the register-blocked solve of ``cpu_blocked``."""
    if not _blockable(y, w):
        return diagonal_inverse_plain(y, w)
    x = cpu_blocked.diagonal_inverse(_in_whole_rows(y), np.ascontiguousarray(w))
    return _first_images(x, y.shape[-1])


def _diagonal_pays(y, w):
    """Is there enough work per anti-diagonal (DIAGONAL_MIN_FLOPS on average) for the
    anti-diagonal schedule's barrier to pay?"""
    G, H, W, C, B = y.shape
    k = w.shape[1]
    flops = 2.0 * G * H * W * max(B, LANES) * k * k * C * C
    return flops / (H + W - 1) >= DIAGONAL_MIN_FLOPS


def wavefront_inverse(y, w):
    """x such that conv_forward(x, w) == y, with the schedule that suits the batch: the
    per-thread sweep when the (group, image chunk) pieces fill the threads, else the
    anti-diagonal sweep if each diagonal has enough work for its barrier to pay
    (``_diagonal_pays``), else the sweep on one thread. Register-blocked, so chunks of 8 images
    are as fast per image as longer ones (MIN_BLOCKED_SWEEP_LANES): on 2 threads a batch of 16
    is swept as two chunks of 8 with no barrier, where the plain kernels take the diagonals.
    And a blocked pixel is so quick that a small batch's diagonal is over in microseconds:
    under load (2 cores busy with another job) the diagonal schedule took 3-14× as long as one
    thread sweeping alone (B = 1 and 8, C = 12, 16×16 and 32×32; B = 1, C = 48, 16×16: 3×)."""
    if (_fills_threads(y.shape[0], y.shape[4], MIN_BLOCKED_SWEEP_LANES)
            or not _diagonal_pays(y, w)):
        return sweep_inverse(y, w)
    return diagonal_inverse(y, w)
