"""Numba CUDA kernels of the masked k×k convolution in its top-left form (same API as cpu.py).

Arrays are grouped and channel-last (the canonical layout; the CPU kernels are batch-last, see
``cpu.py``), and the weights are as in ``cpu.py``::

    x, y  : (G, B, H, W, C)     images, channel-last, C-contiguous
    w     : (G, k, k, C, C)     w[g, a, b, ci, co], the effective (masked) weight

The top-left convolution, zero padding on the top and the left::

    y[g, n, i, j, co] = sum_{a, b, ci} w[g, a, b, ci, co] * x[g, n, i-(k-1)+a, j-(k-1)+b, ci]

The self-tap a = b = k-1 is the lower-triangular C×C block L[co, ci] = w[g, k-1, k-1, ci, co]
(nonzero only for co >= ci, nonzero diagonal), so pixels with equal i + j are independent and
the inverse is solved one anti-diagonal after the other.

Arrays in, arrays out. With CuPy inputs the kernels read them in place (through
``__cuda_array_interface__``), write new CuPy arrays, and launch on CuPy's current stream, so
they order correctly with the CuPy operations around them. With NumPy inputs (the CUDA
simulator, ``NUMBA_ENABLE_CUDASIM=1``, or a GPU user without CuPy) the inputs are copied to the
device once, every launch of the call runs there, and the outputs are copied back as NumPy
arrays. CuPy is imported only inside a call whose input is a CuPy array.

Design (not yet measured on a GPU: this file was written and tested under the simulator)
---------------------------------------------------------------------------------------
Thread mapping: one thread per output element (group, batch, pixel, output channel). The
accumulator of a dot product then lives in one register, whatever C is (a thread per pixel
would need a C-sized local array, and Numba's local arrays need a compile-time size); there
are C times more threads than pixels, which a GPU needs at the small image sizes of flows
(B=64, 16×16, C=12: 197k threads instead of 16k); and neighbouring threads hold neighbouring
output channels, so the writes of y and the reads of w are coalesced while the reads of x are
broadcasts of one value to the threads of a pixel.

Wavefront inverse: one kernel that sweeps every anti-diagonal, one thread block per
(group, batch) element, ``cuda.syncthreads()`` between the steps (``wavefront_inverse``). One
image's anti-diagonal has at most min(H, W) pixels, i.e. at most min(H, W)·C (pixel, channel)
work items, which one block holds, so launching per diagonal would not give a diagonal more
parallelism; it would add H+W-1 launch latencies per call, and the sweep keeps each image on
one multiprocessor, where the pixels solved on earlier diagonals stay in its L1 cache. The
one-launch-per-diagonal form is kept too (``wavefront_inverse_per_diagonal``, same device
function, each block a slice of the diagonal's (group, batch, pixel) list) so that the choice
can be measured on a GPU (only G·B blocks are busy in the sweep, so for a single image with
min(H, W)·C much larger than one block it could win).

Forward substitution inside the wavefront: all C threads of a pixel first compute its residual
r = y - (every tap but the self-tap), then channel c is finished at step c, with one block-wide
barrier per step (C barriers per anti-diagonal)::

    x[c] = (r[c] - sum_{c' < c} L[c, c'] x[c']) / L[c, c]

Every element sees the same operations in the same order as in ``cpu.py``: the residual sums the
taps in (a, b, ci) order, then L[c, c'] x[c'] is subtracted for c' = 0, 1, ..., c-1, then the
division by the diagonal. (The GPU may still fuse a multiply and an add into one FMA, so results
agree to rounding, not bit for bit.)

Weight gradient: a reduction over the batch and the pixels, done in two passes without atomics.
Pass 1: one thread per (chunk, group, tap, ci, co) sums the pixels of one chunk (one image, a
band of rows, about ``WEIGHT_GRAD_CHUNK`` pixels); pass 2: one thread per weight entry adds the
chunks' partial sums in a fixed order. The result is bit-for-bit reproducible from run to run
(float atomics add in whatever order threads arrive, so a resumed training run would drift), it
needs no float64 atomic add, and the partial buffer is small (chunks × k²C² values).
"""
import numpy as np
from numba import cuda

from ..backend import is_cupy_array
from . import CANONICAL_AXES, from_groups_by_transpose, input_grad_by_flips, to_groups_by_transpose

AXES = CANONICAL_AXES      # the kernels' arrays are (G, B, H, W, C), channel-last


def to_groups(x, flips):
    """(B, C, H, W) -> (G, B, H, W, Cg), each group in its top-left form (see kernels/__init__)."""
    return to_groups_by_transpose(x, flips, AXES)


def from_groups(xg, flips, n_images):
    """The inverse of ``to_groups``: (G, B, H, W, Cg) -> (B, G·Cg, H, W); B == n_images here
    (the CPU layout pads its batch axis, this one does not)."""
    return from_groups_by_transpose(xg, flips, AXES)

THREADS_PER_BLOCK = 128   # the flat kernels (one thread per output element)
# Threads per block of the solve kernels, at most: ptxas (CUDA 12.9, sm_90) gives them about 64
# registers per thread, so 1024-thread blocks would sit at the 64K-register limit of a block;
# 256 always launches, and a diagonal with more (pixel, channel) items loops over them.
MAX_SOLVE_BLOCK = 256
WEIGHT_GRAD_CHUNK = 256   # about this many pixels per partial sum of the weight gradient


# ---------------------------------------------------------------------------------------------
# Device side
# ---------------------------------------------------------------------------------------------
@cuda.jit(device=True, inline=True)
def _imin(a, b):
    """min of two integers (spelled out: the kernels avoid the builtin's generic overload)."""
    return a if a < b else b


@cuda.jit(device=True, inline=True)
def _imax(a, b):
    """max of two integers."""
    return a if a > b else b


@cuda.jit
def _conv_forward_kernel(x, w, y, zero):
    """y[g, n, i, j, co] = sum_{a, b, ci} w[g, a, b, ci, co] * x[g, n, i-(k-1)+a, j-(k-1)+b, ci].

    One thread per element of y, the flat index t running over (g, n, i, j, co), co fastest.
    ``zero`` is 0 in the arrays' dtype, so that float32 accumulates in float32 as on the CPU.
    """
    G, B, H, W, C_in = x.shape
    k = w.shape[1]
    C_out = w.shape[4]
    t = cuda.grid(1)
    if t >= G * B * H * W * C_out:
        return
    co = t % C_out
    p = t // C_out
    j = p % W
    p //= W
    i = p % H
    p //= H
    n = p % B
    g = p // B
    acc = zero
    for a in range(k):
        ii = i - (k - 1) + a
        if ii < 0:
            continue
        for b in range(k):
            jj = j - (k - 1) + b
            if jj < 0:
                continue
            for ci in range(C_in):
                acc += w[g, a, b, ci, co] * x[g, n, ii, jj, ci]
    y[g, n, i, j, co] = acc


@cuda.jit
def _weight_grad_partial_kernel(x, dy, partial, rows_per_chunk, zero):
    """Pass 1 of the weight gradient: one chunk's share of the sum over (n, i, j).

    Chunk s covers image n = s // n_bands and the rows i of band s % n_bands, i.e.
    [band·R, band·R + R) with R = rows_per_chunk::

        partial[s, g, a, b, ci, co] = sum_{i in band, j} x[g, n, i-(k-1)+a, j-(k-1)+b, ci]
                                                        * dy[g, n, i, j, co]

    (only the pixels whose tap lands inside the image: i >= k-1-a, j >= k-1-b). One thread per
    element of ``partial``, the flat index running over (s, g, a, b, ci, co), co fastest.
    """
    G, B, H, W, C_in = x.shape
    C_out = dy.shape[4]
    S = partial.shape[0]
    k = partial.shape[2]
    t = cuda.grid(1)
    if t >= S * G * k * k * C_in * C_out:
        return
    co = t % C_out
    p = t // C_out
    ci = p % C_in
    p //= C_in
    b = p % k
    p //= k
    a = p % k
    p //= k
    g = p % G
    s = p // G
    n_bands = S // B
    n = s // n_bands
    i_start = (s % n_bands) * rows_per_chunk
    i_end = _imin(H, i_start + rows_per_chunk)
    acc = zero
    for i in range(_imax(i_start, k - 1 - a), i_end):
        ii = i - (k - 1) + a
        for j in range(k - 1 - b, W):
            acc += x[g, n, ii, j - (k - 1) + b, ci] * dy[g, n, i, j, co]
    partial[s, g, a, b, ci, co] = acc


@cuda.jit
def _sum_partials_kernel(partial, dw, zero):
    """Pass 2 of the weight gradient: dw[g, a, b, ci, co] = sum_s partial[s, g, a, b, ci, co],
    s = 0, 1, ... in order. One thread per element of dw, co fastest."""
    S, G, k, _, C_in, C_out = partial.shape
    t = cuda.grid(1)
    if t >= G * k * k * C_in * C_out:
        return
    co = t % C_out
    p = t // C_out
    ci = p % C_in
    p //= C_in
    b = p % k
    p //= k
    a = p % k
    g = p // k
    acc = zero
    for s in range(S):
        acc += partial[s, g, a, b, ci, co]
    dw[g, a, b, ci, co] = acc


@cuda.jit(device=True)
def _solve_pixels(y, w, x, d, i_first, n_pixels, t_begin, t_end, zero):
    """Solve the pixels t_begin .. t_end-1 of anti-diagonal d, with every thread of the block.

    Pixel t of the flat list of anti-diagonal d (n_pixels pixels per image, the first in row
    i_first) is image n = (t // n_pixels) % B of group g = t // (B·n_pixels), at row
    i = i_first + t % n_pixels and column j = d - i. Every pixel it depends on (smaller i + j)
    must be solved already and visible to this block. Work item q = (pixel, co), co fastest,
    spread over the block's threads; every thread of the block must call this function.

    Step 0, all channels at once: the residual r = y - (every tap but the self-tap, applied to
    the solved x), written into x in place; channel 0 is finished at once, x[0] = r[0] / L[0, 0].
    Step c = 1 .. C-1, after a barrier: channel c-1 is final; every channel co >= c subtracts
    L[co, c-1] x[c-1], and channel c, now complete, is divided by L[c, c]::

        x[co] = (r[co] - sum_{c' < co} L[co, c'] x[c']) / L[co, co]
        L[co, c'] = w[g, k-1, k-1, c', co]

    A barrier ends every step, the last one included, so that the caller can go straight on to
    pixels that read these.
    """
    B = y.shape[1]
    C = y.shape[4]
    k = w.shape[1]
    n_items = (t_end - t_begin) * C
    first = cuda.threadIdx.x
    stride = cuda.blockDim.x
    for q in range(first, n_items, stride):
        t = t_begin + q // C
        co = q % C
        g = t // (B * n_pixels)
        n = (t // n_pixels) % B
        i = i_first + t % n_pixels
        j = d - i
        acc = zero
        for a in range(k):
            ii = i - (k - 1) + a
            if ii < 0:
                continue
            for b in range(k):
                jj = j - (k - 1) + b
                if jj < 0 or (a == k - 1 and b == k - 1):
                    continue
                for ci in range(C):
                    acc += w[g, a, b, ci, co] * x[g, n, ii, jj, ci]
        r = y[g, n, i, j, co] - acc
        if co == 0:
            r = r / w[g, k - 1, k - 1, 0, 0]
        x[g, n, i, j, co] = r
    cuda.syncthreads()
    for c in range(1, C):
        for q in range(first, n_items, stride):
            co = q % C
            if co >= c:
                t = t_begin + q // C
                g = t // (B * n_pixels)
                n = (t // n_pixels) % B
                i = i_first + t % n_pixels
                j = d - i
                r = x[g, n, i, j, co] - w[g, k - 1, k - 1, c - 1, co] * x[g, n, i, j, c - 1]
                if co == c:
                    r = r / w[g, k - 1, k - 1, c, c]
                x[g, n, i, j, co] = r
        cuda.syncthreads()


@cuda.jit
def _wavefront_sweep_kernel(y, w, x, zero):
    """The whole wavefront solve in one launch: block e = g·B + n solves image n of group g,
    anti-diagonal d = 0, 1, ..., H+W-2 in turn (the barriers inside ``_solve_pixels`` separate
    the steps)."""
    H = y.shape[2]
    W = y.shape[3]
    e = cuda.blockIdx.x
    for d in range(H + W - 1):
        i_first = _imax(0, d - (W - 1))
        n_pixels = _imin(H - 1, d) - i_first + 1
        _solve_pixels(y, w, x, d, i_first, n_pixels, e * n_pixels, (e + 1) * n_pixels, zero)


@cuda.jit
def _wavefront_diagonal_kernel(y, w, x, d, pixels_per_block, zero):
    """Anti-diagonal d only: block m solves pixels [m·P, m·P + P) of the diagonal's flat
    (group, batch, pixel) list, P = pixels_per_block. One launch per diagonal."""
    G, B, H, W, _ = y.shape
    i_first = _imax(0, d - (W - 1))
    n_pixels = _imin(H - 1, d) - i_first + 1
    t_begin = cuda.blockIdx.x * pixels_per_block
    t_end = _imin(t_begin + pixels_per_block, G * B * n_pixels)
    _solve_pixels(y, w, x, d, i_first, n_pixels, t_begin, t_end, zero)


@cuda.jit
def _raster_kernel(y, w, x, zero):
    """The raster-order solve: block e = g·B + n solves image n of group g pixel after pixel,
    (0, 0), (0, 1), ..., (H-1, W-1): H·W sequential steps, the block's threads sharing only the
    channels of the current pixel."""
    H = y.shape[2]
    W = y.shape[3]
    e = cuda.blockIdx.x
    for i in range(H):
        for j in range(W):
            _solve_pixels(y, w, x, i + j, i, 1, e, e + 1, zero)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
class _Call:
    """The device side of one kernel call: where its arrays live and the stream it launches on.

    CuPy input: CuPy's current stream; inputs are read in place, outputs are new CuPy arrays.
    NumPy input: the default stream; inputs are copied to the device once, outputs copied back.
    """

    def __init__(self, like):
        self.on_cupy = is_cupy_array(like)
        self._cupy_arrays = {}   # id(device view) -> the CuPy array behind it, kept alive
        if self.on_cupy:
            import cupy
            self._cupy = cupy
            ptr = cupy.cuda.get_current_stream().ptr
            # ptr 0 is CUDA's legacy default stream, which Numba's stream 0 need not be
            self.stream = cuda.external_stream(ptr) if ptr else cuda.legacy_default_stream()
        else:
            self.stream = 0

    def _view(self, a):
        view = cuda.as_cuda_array(a, sync=False)   # same stream as the launches: no sync needed
        self._cupy_arrays[id(view)] = (view, a)
        return view

    def input(self, a, dtype):
        """A C-contiguous device view of ``a`` in ``dtype``."""
        if self.on_cupy:
            return self._view(self._cupy.ascontiguousarray(a, dtype=dtype))
        return cuda.to_device(np.ascontiguousarray(a, dtype=dtype), stream=self.stream)

    def output(self, shape, dtype):
        """A new uninitialized C-contiguous device array (every kernel writes all of it)."""
        if self.on_cupy:
            return self._view(self._cupy.empty(shape, dtype=dtype))
        return cuda.device_array(shape, dtype=dtype, stream=self.stream)

    def result(self, out):
        """``out`` as the caller's kind of array: the CuPy array behind it, or a NumPy copy."""
        if self.on_cupy:
            return self._cupy_arrays[id(out)][1]
        return out.copy_to_host(stream=self.stream)

    def launch(self, kernel, n_blocks, threads_per_block, *args):
        """kernel[n_blocks, threads_per_block, stream](*args)."""
        kernel[n_blocks, threads_per_block, self.stream](*args)


def _dtype(a):
    dtype = np.dtype(a.dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"the CUDA kernels take float32 or float64 arrays, got {dtype}")
    return dtype


def _check_weight(w, C, name):
    if w.ndim != 5 or w.shape[1] != w.shape[2] or w.shape[3] != C:
        raise ValueError(f"w must have shape (G, k, k, {C}, C_out) to match {name}, "
                         f"got {tuple(w.shape)}")


def _blocks(n_items, items_per_block=THREADS_PER_BLOCK):
    """Blocks needed to cover n_items with items_per_block each."""
    return max(1, -(-n_items // items_per_block))


def _solve_threads(max_pixels, C):
    """Threads per block of a solve kernel: one per (pixel, channel) work item, at most
    MAX_SOLVE_BLOCK (the threads then loop over the items)."""
    return max(1, min(MAX_SOLVE_BLOCK, max_pixels * C))


def conv_forward(x, w):
    """y = the top-left masked convolution of x (G, B, H, W, C_in) with w (G, k, k, C_in, C_out).

    y[g, n, i, j, co] = sum_{a, b, ci} w[g, a, b, ci, co] * x[g, n, i-(k-1)+a, j-(k-1)+b, ci]
    """
    dtype = _dtype(x)
    G, B, H, W, C_in = x.shape
    _check_weight(w, C_in, "x")
    C_out = w.shape[4]
    call = _Call(x)
    x_d, w_d = call.input(x, dtype), call.input(w, dtype)
    y_d = call.output((G, B, H, W, C_out), dtype)
    call.launch(_conv_forward_kernel, _blocks(G * B * H * W * C_out), THREADS_PER_BLOCK,
                x_d, w_d, y_d, dtype.type(0))
    return call.result(y_d)


def conv_input_grad(dy, w):
    """dx = the gradient of ``conv_forward`` with respect to x (dy: (G, B, H, W, C_out)): the
    forward kernel run on the flipped dy, see ``input_grad_by_flips``."""
    G, B, H, W, C_out = dy.shape
    if w.ndim != 5 or w.shape[4] != C_out:
        raise ValueError(f"w must have shape (G, k, k, C_in, {C_out}) to match dy, "
                         f"got {tuple(w.shape)}")
    return input_grad_by_flips(conv_forward, dy, w)


def conv_weight_grad(x, dy, k):
    """dw[g, a, b, ci, co] = sum_{n, i, j} x[g, n, i-(k-1)+a, j-(k-1)+b, ci] * dy[g, n, i, j, co].

    The gradient of ``conv_forward`` with respect to w, shape (G, k, k, C_in, C_out), in two
    passes: partial sums over chunks of about WEIGHT_GRAD_CHUNK pixels (one image, a band of
    rows), then their sum in a fixed order (deterministic, no atomics).
    """
    dtype = _dtype(x)
    G, B, H, W, C_in = x.shape
    if dy.shape[:4] != x.shape[:4]:
        raise ValueError(f"dy has shape {tuple(dy.shape)}, x has {tuple(x.shape)}")
    C_out = dy.shape[4]
    k = int(k)
    rows_per_chunk = max(1, min(H, WEIGHT_GRAD_CHUNK // W))
    n_chunks = B * (-(-H // rows_per_chunk))
    call = _Call(x)
    x_d, dy_d = call.input(x, dtype), call.input(dy, dtype)
    partial_d = call.output((n_chunks, G, k, k, C_in, C_out), dtype)
    dw_d = call.output((G, k, k, C_in, C_out), dtype)
    zero = dtype.type(0)
    call.launch(_weight_grad_partial_kernel, _blocks(n_chunks * G * k * k * C_in * C_out),
                THREADS_PER_BLOCK, x_d, dy_d, partial_d, rows_per_chunk, zero)
    call.launch(_sum_partials_kernel, _blocks(G * k * k * C_in * C_out), THREADS_PER_BLOCK,
                partial_d, dw_d, zero)
    return call.result(dw_d)


def _inverse_setup(y, w):
    dtype = _dtype(y)
    G, B, H, W, C = y.shape
    _check_weight(w, C, "y")
    if w.shape[4] != C:
        raise ValueError(f"the inverse needs a square channel map, got w of shape {tuple(w.shape)}")
    call = _Call(y)
    return call, call.input(y, dtype), call.input(w, dtype), call.output(y.shape, dtype), dtype


def wavefront_inverse(y, w):
    """x such that conv_forward(x, w) == y: the anti-diagonal sweep, one launch in all.

    One block per (group, batch) element walks d = 0 .. H+W-2; on each anti-diagonal i + j = d
    its threads solve every pixel's channels (residual, then forward substitution through the
    self-tap, see ``_solve_pixels``), with block-wide barriers between the steps.
    """
    call, y_d, w_d, x_d, dtype = _inverse_setup(y, w)
    G, B, H, W, C = y.shape
    call.launch(_wavefront_sweep_kernel, G * B, _solve_threads(min(H, W), C),
                y_d, w_d, x_d, dtype.type(0))
    return call.result(x_d)


def wavefront_inverse_per_diagonal(y, w, pixels_per_block=None):
    """The same solve as ``wavefront_inverse``, one launch per anti-diagonal (H+W-1 launches),
    each spreading the diagonal's (group, batch, pixel) list over the whole GPU in blocks of
    ``pixels_per_block`` pixels (default: as many as fill MAX_SOLVE_BLOCK threads)."""
    call, y_d, w_d, x_d, dtype = _inverse_setup(y, w)
    G, B, H, W, C = y.shape
    if pixels_per_block is None:
        pixels_per_block = max(1, MAX_SOLVE_BLOCK // C)
    zero = dtype.type(0)
    for d in range(H + W - 1):
        n_pixels = min(H - 1, d) - max(0, d - (W - 1)) + 1
        call.launch(_wavefront_diagonal_kernel, _blocks(G * B * n_pixels, pixels_per_block),
                    _solve_threads(pixels_per_block, C), y_d, w_d, x_d, d, pixels_per_block, zero)
    return call.result(x_d)


def raster_inverse(y, w):
    """The same solve pixel after pixel in raster order (Emerging's way): H·W sequential steps,
    parallel over (group, batch) elements (one block each) and, within the current pixel, over
    its channels. The baseline the wavefront is measured against."""
    call, y_d, w_d, x_d, dtype = _inverse_setup(y, w)
    G, B, H, W, C = y.shape
    call.launch(_raster_kernel, G * B, _solve_threads(1, C), y_d, w_d, x_d, dtype.type(0))
    return call.result(x_d)
