"""Register-blocked Numba CPU kernels of the masked k×k convolution: the forward and the inverse
(both schedules), in the batch-last layout of ``cpu.py`` (its docstring gives the layout and the
formulas; ``cpu.py`` keeps the plain kernels beside these as their reference, and its public
names are these kernels).

**The register block.** The plain kernels add each product into memory: for every (tap, input
channel) they load a row of B outputs, fuse-multiply-add and store it again, so the loop runs at
the machine's load/store rate, not its FMA rate. Here a block of outputs, P ≤ 6 output channels
× one SIMD row of images (64 bytes: 16 float32 or 8 float64 lanes; a tail of 32 bytes, 8 or 4
lanes), stays in registers across all taps and input channels and is stored once. Each step
of the inner loop (one tap, one input channel) loads one row of images and P broadcast weights
and does P fused multiply-adds: 6 accumulators of 64 bytes are 12 AVX2 registers (of 16) or 6
AVX-512 ones, and LLVM folds the weight broadcasts into the FMAs (``vfmadd231ps (mem){1to16},
%zmm, %zmm`` on AVX-512, ``vbroadcastss`` + ``vfmadd231ps %ymm`` on AVX2). A pixel's C output
channels are split into ⌈C/6⌉ blocks of as equal sizes as possible (C = 12: 6 + 6; C = 7:
4 + 3; C = 3: one block of 3).

Numba has no SIMD types, so the block is a type of its own (``Block``: P LLVM vectors, an
``[P x <NB x float>]`` value) with four intrinsics that write the LLVM IR directly: zeros, the
P fused multiply-adds of one step (``llvm.fma.v16f32``: always fused, so the result is the same
on every machine), the store, and the inverse's in-register triangular solve. Their indices are
flat element offsets into C-contiguous arrays; no bounds are checked.

**Every image gets the same operations in the same order** whatever block, chunk or thread
handles it: output (co, n) = fma(w, x, ...) over the taps (a, b) in order and the input channels
in order, starting from zero. So the results do not depend on the number of threads, and an
image of a padded batch gets exactly what it gets alone. The batch must be a multiple of 8
(``cpu.padded_batch`` makes it one for B ≥ 8); the wrappers in ``cpu.py`` pad a smaller or
ragged batch with zero images and drop them after.

**The inverse** solves pixel (i, j)'s block of P channels co0 .. co0+P-1 in registers: the
accumulators gather every tap but the self-tap, then the self-tap's already solved channels
ci < co0 of this pixel (they are taps like the others), then ``block_solve`` runs the forward
substitution through the block's own P×P corner of the lower-triangular self-tap in registers:
x[c] = (y[c] - acc[c]) / L[c, c], then acc[c'] += L[c', c]·x[c] for the block's later channels.
One store per solved row, as in the forward.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils, errors
from numba.extending import intrinsic, models, register_model

BLOCK_BYTES = 64     # one row of a block: 16 float32 / 8 float64 lanes (2 AVX2 or 1 AVX-512 register)
TAIL_BYTES = 32      # the tail rows: 8 float32 / 4 float64 lanes
MAX_BLOCK_CHANNELS = 6          # output channels of a block of 64-byte rows
MAX_TAIL_BLOCK_CHANNELS = 12    # ... of 32-byte rows


class Block(types.Type):
    """P vectors of NB lanes of ``dtype``: a block of outputs held in registers."""

    def __init__(self, dtype, P, NB):
        self.dtype, self.P, self.NB = dtype, P, NB
        super().__init__(name=f"nfcore.Block({dtype}, {P}, {NB})")


@register_model(Block)
class _BlockModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        vector = ir.VectorType(dmm.lookup(fe_type.dtype).get_value_type(), fe_type.NB)
        super().__init__(dmm, fe_type, ir.ArrayType(vector, fe_type.P))


def _literal(value_type, what):
    if not isinstance(value_type, types.IntegerLiteral):
        raise errors.RequireLiteralValue(f"{what} must be a compile-time constant")
    return value_type.literal_value


def _contiguous_float(array_type, what):
    if not (isinstance(array_type, types.Array) and array_type.layout == "C"
            and array_type.dtype in (types.float32, types.float64)):
        raise errors.TypingError(f"{what}: a C-contiguous float32/float64 array, got {array_type}")


def _vector_type(context, block_type):
    return ir.VectorType(context.get_value_type(block_type.dtype), block_type.NB)


def _element_pointer(context, builder, array_type, array, index):
    return builder.gep(context.make_array(array_type)(context, builder, array).data, [index])


def _vector_pointer(context, builder, array_type, array, index, vector):
    pointer = _element_pointer(context, builder, array_type, array, index)
    return builder.bitcast(pointer, vector.as_pointer())


def _broadcast(builder, scalar, vector):
    lanes = vector.count
    first = builder.insert_element(ir.Constant(vector, ir.Undefined), scalar,
                                   ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(first, ir.Constant(vector, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))


def _fma(builder, vector, block_type):
    suffix = f"v{block_type.NB}f{64 if block_type.dtype == types.float64 else 32}"
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector] * 3),
                                          "llvm.fma." + suffix)


def _offset(builder, index, step):
    return builder.add(index, ir.Constant(index.type, step)) if step else index


@intrinsic
def block_zeros(typingctx, like, P, row_bytes):
    """A Block of zeros of ``like``'s dtype: P channels × row_bytes of lanes (both constants)."""
    _contiguous_float(like, "block_zeros")
    lanes = _literal(row_bytes, "row_bytes") * 8 // like.dtype.bitwidth
    block_type = Block(like.dtype, _literal(P, "P"), lanes)

    def codegen(context, builder, signature, args):
        return ir.Constant(context.get_value_type(block_type), None)
    return block_type(like, P, row_bytes), codegen


@intrinsic
def block_fma(typingctx, acc, x, x_index, w, w_index):
    """acc[p] += w.flat[w_index + p] * x.flat[x_index : x_index + NB] for p < P, fused."""
    _contiguous_float(x, "block_fma x")
    _contiguous_float(w, "block_fma w")
    if not isinstance(acc, Block) or x.dtype != acc.dtype or w.dtype != acc.dtype:
        raise errors.TypingError("block_fma: a Block and arrays of its dtype")

    def codegen(context, builder, signature, args):
        block_type = signature.args[0]
        acc_value, x_array, x_at, w_array, w_at = args
        vector = _vector_type(context, block_type)
        fma = _fma(builder, vector, block_type)
        row = builder.load(_vector_pointer(context, builder, signature.args[1], x_array, x_at,
                                           vector), align=x.dtype.bitwidth // 8)
        for p in range(block_type.P):
            weight = builder.load(_element_pointer(context, builder, signature.args[3], w_array,
                                                   _offset(builder, w_at, p)))
            total = builder.call(fma, [_broadcast(builder, weight, vector), row,
                                       builder.extract_value(acc_value, p)])
            acc_value = builder.insert_value(acc_value, total, p)
        return acc_value
    return acc(acc, x, x_index, w, w_index), codegen


@intrinsic
def block_store(typingctx, acc, y, y_index, stride):
    """y.flat[y_index + p·stride : ... + NB] = acc[p] for p < P."""
    _contiguous_float(y, "block_store y")
    if not isinstance(acc, Block) or y.dtype != acc.dtype:
        raise errors.TypingError("block_store: a Block and an array of its dtype")

    def codegen(context, builder, signature, args):
        block_type = signature.args[0]
        acc_value, y_array, y_at, step = args
        vector = _vector_type(context, block_type)
        for p in range(block_type.P):
            at = builder.add(y_at, builder.mul(step, ir.Constant(step.type, p)))
            builder.store(builder.extract_value(acc_value, p),
                          _vector_pointer(context, builder, signature.args[1], y_array, at, vector),
                          align=y.dtype.bitwidth // 8)
        return context.get_dummy_value()
    return types.none(acc, y, y_index, stride), codegen


@intrinsic
def block_solve(typingctx, acc, y, y_index, stride, w, w_index, w_stride, x, x_index):
    """The forward substitution of one block in registers. For p = 0 .. P-1:
    v = (y.flat[y_index + p·stride : .. + NB] - acc[p]) / L[p, p], stored at
    x.flat[x_index + p·stride : .. + NB], then acc[q] += L[q, p]·v for q > p (fused), where
    L[q, p] = w.flat[w_index + p·w_stride + q] (the self-tap w[g, k-1, k-1, ci, co] at
    ci = co0 + p, co = co0 + q)."""
    for array, what in ((y, "y"), (w, "w"), (x, "x")):
        _contiguous_float(array, f"block_solve {what}")
        if not isinstance(acc, Block) or array.dtype != acc.dtype:
            raise errors.TypingError("block_solve: a Block and arrays of its dtype")

    def codegen(context, builder, signature, args):
        block_type = signature.args[0]
        acc_value, y_array, y_at, step, w_array, w_at, w_step, x_array, x_at = args
        y_type, w_type, x_type = signature.args[1], signature.args[4], signature.args[7]
        vector = _vector_type(context, block_type)
        fma = _fma(builder, vector, block_type)
        align = y.dtype.bitwidth // 8

        def weight(p, q):
            at = builder.add(_offset(builder, w_at, q), builder.mul(w_step, ir.Constant(w_step.type, p)))
            return _broadcast(builder, builder.load(_element_pointer(context, builder, w_type,
                                                                     w_array, at)), vector)

        for p in range(block_type.P):
            row = builder.mul(step, ir.Constant(step.type, p))
            y_row = builder.load(_vector_pointer(context, builder, y_type, y_array,
                                                 builder.add(y_at, row), vector), align=align)
            solved = builder.fdiv(builder.fsub(y_row, builder.extract_value(acc_value, p)),
                                  weight(p, p))
            builder.store(solved, _vector_pointer(context, builder, x_type, x_array,
                                                  builder.add(x_at, row), vector), align=align)
            for q in range(p + 1, block_type.P):
                total = builder.call(fma, [weight(p, q), solved, builder.extract_value(acc_value, q)])
                acc_value = builder.insert_value(acc_value, total, q)
        return context.get_dummy_value()
    return types.none(acc, y, y_index, stride, w, w_index, w_stride, x, x_index), codegen


TILE_BYTES = 32     # the layout conversions' square tiles: 8×8 float32, 4×4 float64


@intrinsic
def tile_transpose(typingctx, src, src_index, src_stride, dst, dst_index, dst_stride):
    """dst.flat[dst_index + q·dst_stride + r] = src.flat[src_index + r·src_stride + q] for
    0 <= q, r < L = TILE_BYTES / itemsize (strides may be negative): L rows loaded as vectors,
    transposed in registers by log2(L) rounds of two-vector shuffles (round h swaps the
    off-diagonal h×h blocks of every 2h×2h block), L vectors stored."""
    _contiguous_float(src, "tile_transpose src")
    _contiguous_float(dst, "tile_transpose dst")
    if src.dtype != dst.dtype:
        raise errors.TypingError("tile_transpose: arrays of one dtype")

    def codegen(context, builder, signature, args):
        src_array, src_at, src_step, dst_array, dst_at, dst_step = args
        src_type, dst_type = signature.args[0], signature.args[3]
        lanes = TILE_BYTES * 8 // src_type.dtype.bitwidth
        vector = ir.VectorType(context.get_value_type(src_type.dtype), lanes)
        align = src_type.dtype.bitwidth // 8

        def at(start, step, row):
            return builder.add(start, builder.mul(step, ir.Constant(step.type, row)))

        rows = [builder.load(_vector_pointer(context, builder, src_type, src_array,
                                             at(src_at, src_step, r), vector), align=align)
                for r in range(lanes)]
        h = lanes // 2
        while h >= 1:
            first = [p if p % (2 * h) < h else lanes + p - h for p in range(lanes)]
            second = [p + h if p % (2 * h) < h else lanes + p for p in range(lanes)]
            mask_first = ir.Constant(ir.VectorType(ir.IntType(32), lanes), first)
            mask_second = ir.Constant(ir.VectorType(ir.IntType(32), lanes), second)
            for a in [r for r in range(lanes) if r % (2 * h) < h]:
                b = a + h
                rows[a], rows[b] = (builder.shuffle_vector(rows[a], rows[b], mask_first),
                                    builder.shuffle_vector(rows[a], rows[b], mask_second))
            h //= 2
        for q in range(lanes):
            builder.store(rows[q], _vector_pointer(context, builder, dst_type, dst_array,
                                                   at(dst_at, dst_step, q), vector), align=align)
        return context.get_dummy_value()
    return types.none(src, src_index, src_stride, dst, dst_index, dst_stride), codegen


# ---- the layout conversions, (B, C, H, W) <-> (G, H, W, Cg, B_padded), by tiles --------------

@njit(parallel=True, cache=True)
def to_groups(x, flips, B_padded):
    """``cpu.to_groups`` (x C-contiguous, float32 or float64) by L×L tiles transposed in
    registers; the ragged edges (W or B not a multiple of L) element by element. Parallel over
    (channel, row)."""
    B, C, H, W = x.shape
    G = flips.shape[0]
    Cg = C // G
    L = TILE_BYTES // x.itemsize
    out = np.empty((G, H, W, Cg, B_padded), dtype=x.dtype)
    image_stride, column_stride = C * H * W, Cg * B_padded
    for t in prange(C * H):
        g = t // (Cg * H)
        c = (t // H) % Cg
        i = t % H
        i_source = H - 1 - i if flips[g, 0] else i
        channel = g * Cg + (Cg - 1 - c if flips[g, 2] else c)
        flip_j = flips[g, 1] != 0
        first = ((g * H + i) * W) * Cg + c          # out[g, i, 0, c, 0] / B_padded
        for n0 in range(0, B - L + 1, L):
            for j0 in range(0, W - L + 1, L):       # source columns j0 .. j0+L-1
                j = W - 1 - j0 if flip_j else j0
                tile_transpose(x, ((n0 * C + channel) * H + i_source) * W + j0, image_stride,
                               out, (first + j * Cg) * B_padded + n0,
                               -column_stride if flip_j else column_stride)
        for n in range(B):
            row = x[n, channel, i_source]
            j_first = W - W % L if n < B - B % L else 0     # the tiles did the rest
            for j_source in range(j_first, W):
                j = W - 1 - j_source if flip_j else j_source
                out[g, i, j, c, n] = row[j_source]
        for j in range(W):
            for n in range(B, B_padded):
                out[g, i, j, c, n] = 0
    return out


@njit(parallel=True, cache=True)
def from_groups(xg, flips, n_images):
    """``cpu.from_groups`` (xg C-contiguous, float32 or float64) by L×L tiles, the ragged
    edges element by element. Parallel over (channel, row)."""
    G, H, W, Cg, B_padded = xg.shape
    C = G * Cg
    L = TILE_BYTES // xg.itemsize
    out = np.empty((n_images, C, H, W), dtype=xg.dtype)
    image_stride, column_stride = C * H * W, Cg * B_padded
    for t in prange(C * H):
        g = t // (Cg * H)
        c = (t // H) % Cg
        i = t % H
        i_source = H - 1 - i if flips[g, 0] else i
        c_source = Cg - 1 - c if flips[g, 2] else c
        flip_j = flips[g, 1] != 0
        first = ((g * H + i_source) * W) * Cg + c_source     # xg[g, i_source, 0, c_source, 0] / B_padded
        for n0 in range(0, n_images - L + 1, L):
            for j0 in range(0, W - L + 1, L):       # output columns j0 .. j0+L-1
                j_source = W - 1 - j0 if flip_j else j0
                tile_transpose(xg, (first + j_source * Cg) * B_padded + n0,
                               -column_stride if flip_j else column_stride,
                               out, ((n0 * C + g * Cg + c) * H + i) * W + j0, image_stride)
        for n in range(n_images):
            row = out[n, g * Cg + c, i]
            j_first = W - W % L if n < n_images - n_images % L else 0
            for j in range(j_first, W):
                j_source = W - 1 - j if flip_j else j
                row[j] = xg[g, i_source, j_source, c_source, n]
    return out


# ---- one block ------------------------------------------------------------------------------

@njit(cache=True)
def _forward_block(y, x, w, g, i, j, co, n0, acc):
    """y[g, i, j, co:co+P, n0:n0+NB] = the taps of x (all of them) through w, one store.
    ``acc``: a Block of zeros, whose type gives P and NB (one compiled function each)."""
    _, H, W, C, B = x.shape
    k, C_out = w.shape[1], w.shape[4]
    for a in range(max(0, k - 1 - i), k):
        for b in range(max(0, k - 1 - j), k):
            x_at = (((g * H + i - (k - 1) + a) * W + j - (k - 1) + b) * C) * B + n0
            w_at = (((g * k + a) * k + b) * C) * C_out + co
            for ci in range(C):
                acc = block_fma(acc, x, x_at + ci * B, w, w_at + ci * C_out)
    block_store(acc, y, (((g * H + i) * W + j) * C_out + co) * B + n0, B)


@njit(cache=True)
def _solve_block(x, y, w, g, i, j, co, n0, acc):
    """Solve x[g, i, j, co:co+P, n0:n0+NB], the pixels before (i, j) and the channels before co
    of (i, j) being solved already (see the module docstring). ``acc``: a Block of zeros."""
    _, H, W, C, B = x.shape
    k = w.shape[1]
    for a in range(max(0, k - 1 - i), k):
        for b in range(max(0, k - 1 - j), k):
            if a == k - 1 and b == k - 1:
                continue
            x_at = (((g * H + i - (k - 1) + a) * W + j - (k - 1) + b) * C) * B + n0
            w_at = (((g * k + a) * k + b) * C) * C + co
            for ci in range(C):
                acc = block_fma(acc, x, x_at + ci * B, w, w_at + ci * C)
    pixel_at = (((g * H + i) * W + j) * C) * B + n0
    self_at = (((g * k + k - 1) * k + k - 1) * C) * C + co
    for ci in range(co):
        acc = block_fma(acc, x, pixel_at + ci * B, w, self_at + ci * C)
    block_solve(acc, y, pixel_at + co * B, B, w, self_at + co * C, C, x, pixel_at + co * B)


# ---- one pixel: its channel blocks and its rows of images ------------------------------------

@njit(inline="always")
def _channel_blocks(C, most):
    """(number of blocks, their base size, how many are one larger): ⌈C/most⌉ blocks of equal
    size within one channel, the larger ones first."""
    n_blocks = -(-C // most)
    return n_blocks, C // n_blocks, C % n_blocks


@njit(inline="always")
def _forward_row(y, x, w, g, i, j, n0, row_bytes):
    """All output channels of pixel (i, j) for one 64-byte row of images from n0: blocks of
    up to MAX_BLOCK_CHANNELS = 6 channels (12 AVX2 registers)."""
    n_blocks, base, larger = _channel_blocks(w.shape[4], MAX_BLOCK_CHANNELS)
    co = np.int64(0)       # not the constant 0: a literal argument would compile its own copy
    for block in range(n_blocks):
        P = base + 1 if block < larger else base
        if P == 6:
            _forward_block(y, x, w, g, i, j, co, n0, block_zeros(x, 6, row_bytes))
        elif P == 5:
            _forward_block(y, x, w, g, i, j, co, n0, block_zeros(x, 5, row_bytes))
        elif P == 4:
            _forward_block(y, x, w, g, i, j, co, n0, block_zeros(x, 4, row_bytes))
        elif P == 3:
            _forward_block(y, x, w, g, i, j, co, n0, block_zeros(x, 3, row_bytes))
        elif P == 2:
            _forward_block(y, x, w, g, i, j, co, n0, block_zeros(x, 2, row_bytes))
        else:
            _forward_block(y, x, w, g, i, j, co, n0, block_zeros(x, 1, row_bytes))
        co += P


@njit(inline="always")
def _forward_tail_row(y, x, w, g, i, j, n0, row_bytes):
    """``_forward_row`` for a 32-byte row (one AVX2 register per channel): blocks of up to
    MAX_TAIL_BLOCK_CHANNELS = 12 channels, so that 8 or more independent chains of fused
    multiply-adds hide their latency (4 cycles, 2 a cycle)."""
    n_blocks, base, larger = _channel_blocks(w.shape[4], MAX_TAIL_BLOCK_CHANNELS)
    co = np.int64(0)
    for block in range(n_blocks):
        P = base + 1 if block < larger else base
        if P == 12:
            _forward_block(y, x, w, g, i, j, co, n0, block_zeros(x, 12, row_bytes))
        elif P == 11:
            _forward_block(y, x, w, g, i, j, co, n0, block_zeros(x, 11, row_bytes))
        elif P == 10:
            _forward_block(y, x, w, g, i, j, co, n0, block_zeros(x, 10, row_bytes))
        elif P == 9:
            _forward_block(y, x, w, g, i, j, co, n0, block_zeros(x, 9, row_bytes))
        elif P == 8:
            _forward_block(y, x, w, g, i, j, co, n0, block_zeros(x, 8, row_bytes))
        elif P == 7:
            _forward_block(y, x, w, g, i, j, co, n0, block_zeros(x, 7, row_bytes))
        elif P == 6:
            _forward_block(y, x, w, g, i, j, co, n0, block_zeros(x, 6, row_bytes))
        elif P == 5:
            _forward_block(y, x, w, g, i, j, co, n0, block_zeros(x, 5, row_bytes))
        elif P == 4:
            _forward_block(y, x, w, g, i, j, co, n0, block_zeros(x, 4, row_bytes))
        elif P == 3:
            _forward_block(y, x, w, g, i, j, co, n0, block_zeros(x, 3, row_bytes))
        elif P == 2:
            _forward_block(y, x, w, g, i, j, co, n0, block_zeros(x, 2, row_bytes))
        else:
            _forward_block(y, x, w, g, i, j, co, n0, block_zeros(x, 1, row_bytes))
        co += P


@njit(inline="always")
def _solve_row(x, y, w, g, i, j, n0, row_bytes):
    """Solve every channel of pixel (i, j) for one 64-byte row of images from n0, block after
    block (up to 6 channels each)."""
    n_blocks, base, larger = _channel_blocks(w.shape[4], MAX_BLOCK_CHANNELS)
    co = np.int64(0)       # not the constant 0: a literal argument would compile its own copy
    for block in range(n_blocks):
        P = base + 1 if block < larger else base
        if P == 6:
            _solve_block(x, y, w, g, i, j, co, n0, block_zeros(x, 6, row_bytes))
        elif P == 5:
            _solve_block(x, y, w, g, i, j, co, n0, block_zeros(x, 5, row_bytes))
        elif P == 4:
            _solve_block(x, y, w, g, i, j, co, n0, block_zeros(x, 4, row_bytes))
        elif P == 3:
            _solve_block(x, y, w, g, i, j, co, n0, block_zeros(x, 3, row_bytes))
        elif P == 2:
            _solve_block(x, y, w, g, i, j, co, n0, block_zeros(x, 2, row_bytes))
        else:
            _solve_block(x, y, w, g, i, j, co, n0, block_zeros(x, 1, row_bytes))
        co += P


@njit(inline="always")
def _solve_tail_row(x, y, w, g, i, j, n0, row_bytes):
    """``_solve_row`` for a 32-byte row: blocks of up to 12 channels."""
    n_blocks, base, larger = _channel_blocks(w.shape[4], MAX_TAIL_BLOCK_CHANNELS)
    co = np.int64(0)
    for block in range(n_blocks):
        P = base + 1 if block < larger else base
        if P == 12:
            _solve_block(x, y, w, g, i, j, co, n0, block_zeros(x, 12, row_bytes))
        elif P == 11:
            _solve_block(x, y, w, g, i, j, co, n0, block_zeros(x, 11, row_bytes))
        elif P == 10:
            _solve_block(x, y, w, g, i, j, co, n0, block_zeros(x, 10, row_bytes))
        elif P == 9:
            _solve_block(x, y, w, g, i, j, co, n0, block_zeros(x, 9, row_bytes))
        elif P == 8:
            _solve_block(x, y, w, g, i, j, co, n0, block_zeros(x, 8, row_bytes))
        elif P == 7:
            _solve_block(x, y, w, g, i, j, co, n0, block_zeros(x, 7, row_bytes))
        elif P == 6:
            _solve_block(x, y, w, g, i, j, co, n0, block_zeros(x, 6, row_bytes))
        elif P == 5:
            _solve_block(x, y, w, g, i, j, co, n0, block_zeros(x, 5, row_bytes))
        elif P == 4:
            _solve_block(x, y, w, g, i, j, co, n0, block_zeros(x, 4, row_bytes))
        elif P == 3:
            _solve_block(x, y, w, g, i, j, co, n0, block_zeros(x, 3, row_bytes))
        elif P == 2:
            _solve_block(x, y, w, g, i, j, co, n0, block_zeros(x, 2, row_bytes))
        else:
            _solve_block(x, y, w, g, i, j, co, n0, block_zeros(x, 1, row_bytes))
        co += P


@njit(cache=True)
def _forward_pixel(y, x, w, g, i, j, n0, n1):
    """Pixel (i, j), images n0 <= n < n1 (n1 - n0 a multiple of 8): 64-byte rows, then a
    32-byte tail."""
    lanes, tail = BLOCK_BYTES // x.itemsize, TAIL_BYTES // x.itemsize
    n = n0
    while n + lanes <= n1:
        _forward_row(y, x, w, g, i, j, n, BLOCK_BYTES)
        n += lanes
    while n + tail <= n1:
        _forward_tail_row(y, x, w, g, i, j, n, TAIL_BYTES)
        n += tail


@njit(cache=True)
def _solve_pixel(x, y, w, g, i, j, n0, n1):
    """Solve pixel (i, j) for the images n0 <= n < n1 (a multiple of 8 of them)."""
    lanes, tail = BLOCK_BYTES // x.itemsize, TAIL_BYTES // x.itemsize
    n = n0
    while n + lanes <= n1:
        _solve_row(x, y, w, g, i, j, n, BLOCK_BYTES)
        n += lanes
    while n + tail <= n1:
        _solve_tail_row(x, y, w, g, i, j, n, TAIL_BYTES)
        n += tail


# ---- the kernels (batch a multiple of 8, C-contiguous arrays: the wrappers in cpu.py) --------

@njit(parallel=True, cache=True)
def conv_forward(x, w):
    """y = the top-left masked convolution of x with w; parallel over (group, row)."""
    G, H, W, _, B = x.shape
    y = np.empty((G, H, W, w.shape[4], B), dtype=x.dtype)
    for t in prange(G * H):
        g = t // H
        i = t % H
        for j in range(W):
            _forward_pixel(y, x, w, g, i, j, np.int64(0), B)
    return y


@njit(parallel=True, cache=True)
def sweep(y, w, chunk):
    """The per-thread inverse: each (group, chunk of ``chunk`` images) solved pixel after pixel
    in raster order by one thread, no synchronization."""
    G, H, W, _, B = y.shape
    x = np.empty_like(y)
    n_chunks = -(-B // chunk)
    for t in prange(G * n_chunks):
        g = t // n_chunks
        n0 = (t % n_chunks) * chunk
        n1 = min(B, n0 + chunk)
        for i in range(H):
            for j in range(W):
                _solve_pixel(x, y, w, g, i, j, n0, n1)
    return x


@njit(parallel=True, cache=True)
def diagonal_inverse(y, w):
    """The anti-diagonal inverse: for d = 0 .. H+W-2, every pixel i + j = d of every group
    solved in parallel (all images), a barrier per diagonal."""
    G, H, W, _, B = y.shape
    x = np.empty_like(y)
    for d in range(H + W - 1):
        i_first = max(0, d - (W - 1))
        n_pixels = min(H - 1, d) - i_first + 1
        for t in prange(G * n_pixels):
            g = t // n_pixels
            i = i_first + t % n_pixels
            _solve_pixel(x, y, w, g, i, d - i, np.int64(0), B)
    return x


# ---- the weight gradient: an outer-product block per (tap, chunk of images) ---------------

def _host_has_avx512():
    try:
        import llvmlite.binding as llvm
        return bool(llvm.get_host_cpu_features().get("avx512f", False))
    except Exception:                               # pragma: no cover - not x86, old llvmlite
        return False


# The weight gradient's rows: one register of images, 64 bytes with AVX-512 (32 registers: a
# 3×3 block of 64-byte rows is 9 + 6 of them), else 32 bytes (AVX2: 9 + 6 of its 16); a batch
# that leaves less than a 64-byte row ends with 32-byte rows. Every lane gets the same
# operations whatever its row, so the results are the same on both kinds of machine.
OUTER_ROW_BYTES = 64 if _host_has_avx512() else 32
OUTER_TAIL_BYTES = 32
MAX_OUTER_CHANNELS = 3  # a 3×3 block of (input, output) channels: 9 accumulators + 6 rows


class OuterBlock(types.Type):
    """Pi × Po vectors of NB lanes: the per-lane sums of x[ci] · dy[co] for a block of input
    channels × a block of output channels, held in registers."""

    def __init__(self, dtype, Pi, Po, NB):
        self.dtype, self.Pi, self.Po, self.NB = dtype, Pi, Po, NB
        super().__init__(name=f"nfcore.OuterBlock({dtype}, {Pi}, {Po}, {NB})")


@register_model(OuterBlock)
class _OuterBlockModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        vector = ir.VectorType(dmm.lookup(fe_type.dtype).get_value_type(), fe_type.NB)
        super().__init__(dmm, fe_type, ir.ArrayType(vector, fe_type.Pi * fe_type.Po))


@intrinsic
def outer_zeros(typingctx, like, Pi, Po, row_bytes):
    """An OuterBlock of zeros of ``like``'s dtype (Pi, Po, row_bytes constants)."""
    _contiguous_float(like, "outer_zeros")
    lanes = _literal(row_bytes, "row_bytes") * 8 // like.dtype.bitwidth
    block_type = OuterBlock(like.dtype, _literal(Pi, "Pi"), _literal(Po, "Po"), lanes)

    def codegen(context, builder, signature, args):
        return ir.Constant(context.get_value_type(block_type), None)
    return block_type(like, Pi, Po, row_bytes), codegen


@intrinsic
def outer_fma(typingctx, acc, x, x_index, x_stride, dy, dy_index, dy_stride):
    """acc[p, q] += x.flat[x_index + p·x_stride : .. + NB] * dy.flat[dy_index + q·dy_stride :
    .. + NB] for p < Pi, q < Po, fused: Pi + Po loads, Pi·Po fused multiply-adds."""
    _contiguous_float(x, "outer_fma x")
    _contiguous_float(dy, "outer_fma dy")
    if not isinstance(acc, OuterBlock) or x.dtype != acc.dtype or dy.dtype != acc.dtype:
        raise errors.TypingError("outer_fma: an OuterBlock and arrays of its dtype")

    def codegen(context, builder, signature, args):
        block_type = signature.args[0]
        acc_value, x_array, x_at, x_step, dy_array, dy_at, dy_step = args
        vector = _vector_type(context, block_type)
        fma = _fma(builder, vector, block_type)
        align = x.dtype.bitwidth // 8

        def rows(array_type, array, start, step, count):
            return [builder.load(_vector_pointer(
                context, builder, array_type, array,
                builder.add(start, builder.mul(step, ir.Constant(step.type, p))), vector),
                align=align) for p in range(count)]

        x_rows = rows(signature.args[1], x_array, x_at, x_step, block_type.Pi)
        dy_rows = rows(signature.args[4], dy_array, dy_at, dy_step, block_type.Po)
        for p in range(block_type.Pi):
            for q in range(block_type.Po):
                slot = p * block_type.Po + q
                total = builder.call(fma, [x_rows[p], dy_rows[q],
                                           builder.extract_value(acc_value, slot)])
                acc_value = builder.insert_value(acc_value, total, slot)
        return acc_value
    return acc(acc, x, x_index, x_stride, dy, dy_index, dy_stride), codegen


@intrinsic
def grid_fma(typingctx, acc, x, x_index, x_stride, w, w_index):
    """acc[p, q] += x.flat[x_index + p·x_stride] · w.flat[w_index + q·NB : .. + NB] for p < Pi,
    q < Po, fused: Po vector loads, Pi broadcast scalars, Pi·Po fused multiply-adds (the
    coupling networks' direct convolution, nfcore/nn/conv2d_direct.py: Pi pixels' values of one
    input channel times Po consecutive rows of its weights)."""
    _contiguous_float(x, "grid_fma x")
    _contiguous_float(w, "grid_fma w")
    if not isinstance(acc, OuterBlock) or x.dtype != acc.dtype or w.dtype != acc.dtype:
        raise errors.TypingError("grid_fma: an OuterBlock and arrays of its dtype")

    def codegen(context, builder, signature, args):
        block_type = signature.args[0]
        acc_value, x_array, x_at, x_step, w_array, w_at = args
        vector = _vector_type(context, block_type)
        fma = _fma(builder, vector, block_type)
        w_rows = [builder.load(_vector_pointer(context, builder, signature.args[4], w_array,
                                               _offset(builder, w_at, q * block_type.NB), vector),
                               align=w.dtype.bitwidth // 8) for q in range(block_type.Po)]
        for p in range(block_type.Pi):
            at = builder.add(x_at, builder.mul(x_step, ir.Constant(x_step.type, p)))
            value = _broadcast(builder, builder.load(
                _element_pointer(context, builder, signature.args[1], x_array, at)), vector)
            for q in range(block_type.Po):
                slot = p * block_type.Po + q
                total = builder.call(fma, [value, w_rows[q], builder.extract_value(acc_value, slot)])
                acc_value = builder.insert_value(acc_value, total, slot)
        return acc_value
    return acc(acc, x, x_index, x_stride, w, w_index), codegen


@intrinsic
def outer_store(typingctx, acc, out, index, p_stride, q_stride):
    """out.flat[index + p·p_stride + q·q_stride : .. + NB] = acc[p, q]."""
    _contiguous_float(out, "outer_store out")
    if not isinstance(acc, OuterBlock) or out.dtype != acc.dtype:
        raise errors.TypingError("outer_store: an OuterBlock and an array of its dtype")

    def codegen(context, builder, signature, args):
        block_type = signature.args[0]
        acc_value, out_array, at, p_step, q_step = args
        vector = _vector_type(context, block_type)
        for p in range(block_type.Pi):
            for q in range(block_type.Po):
                where = builder.add(builder.add(at, builder.mul(p_step, ir.Constant(p_step.type, p))),
                                    builder.mul(q_step, ir.Constant(q_step.type, q)))
                builder.store(builder.extract_value(acc_value, p * block_type.Po + q),
                              _vector_pointer(context, builder, signature.args[1], out_array,
                                              where, vector), align=out.dtype.bitwidth // 8)
        return context.get_dummy_value()
    return types.none(acc, out, index, p_stride, q_stride), codegen


@intrinsic
def outer_load(typingctx, like, out, index, p_stride, q_stride):
    """The OuterBlock of ``like``'s type read from out.flat[index + p·p_stride + q·q_stride :
    .. + NB] (``outer_store``'s inverse)."""
    _contiguous_float(out, "outer_load out")
    if not isinstance(like, OuterBlock) or out.dtype != like.dtype:
        raise errors.TypingError("outer_load: an OuterBlock and an array of its dtype")

    def codegen(context, builder, signature, args):
        block_type = signature.args[0]
        _, out_array, at, p_step, q_step = args
        vector = _vector_type(context, block_type)
        value = ir.Constant(context.get_value_type(block_type), None)
        for p in range(block_type.Pi):
            for q in range(block_type.Po):
                where = builder.add(builder.add(at, builder.mul(p_step, ir.Constant(p_step.type, p))),
                                    builder.mul(q_step, ir.Constant(q_step.type, q)))
                row = builder.load(_vector_pointer(context, builder, signature.args[1], out_array,
                                                   where, vector), align=out.dtype.bitwidth // 8)
                value = builder.insert_value(value, row, p * block_type.Po + q)
        return value
    return like(like, out, index, p_stride, q_stride), codegen


OUTER_TILE = 8      # pixels of one image row summed per pass over the taps and channel blocks
OUTER_BAND = 4      # image rows per task (and per partial sum) of the weight gradient


@njit(cache=True)
def _weight_grad_block(partial, x, dy, g, band, c, a, b, n0, ci, co, i, j0, j1, acc):
    """partial[g, band, c, a, b, ci:ci+Pi, co:co+Po, lanes from n0 - c·chunk] += the sums over
    the pixels (i, j0 <= j < j1), in order, of x[g, i-(k-1)+a, j-(k-1)+b, ci.., n] · dy[g, i, j,
    co.., n], per lane: read into registers, summed there, stored once. ``acc``: an OuterBlock
    of zeros, whose type gives Pi, Po and the lanes."""
    _, H, W, C_in, B = x.shape
    C_out = dy.shape[3]
    n_bands, n_chunks, k, chunk = partial.shape[1], partial.shape[2], partial.shape[3], partial.shape[7]
    at = ((((((g * n_bands + band) * n_chunks + c) * k + a) * k + b) * C_in + ci) * C_out + co) \
        * chunk + n0 - c * chunk
    acc = outer_load(acc, partial, at, C_out * chunk, chunk)
    for j in range(j0, j1):
        x_at = (((g * H + i - (k - 1) + a) * W + j - (k - 1) + b) * C_in + ci) * B + n0
        dy_at = (((g * H + i) * W + j) * C_out + co) * B + n0
        acc = outer_fma(acc, x, x_at, B, dy, dy_at, B)
    outer_store(acc, partial, at, C_out * chunk, chunk)


@njit(inline="always")
def _weight_grad_outputs(partial, x, dy, g, band, c, a, b, n0, ci, i, j0, j1, Pi, row_bytes):
    """The blocks of every output channel for the input channels ci .. ci+Pi-1."""
    n_blocks, base, larger = _channel_blocks(dy.shape[3], MAX_OUTER_CHANNELS)
    co = np.int64(0)
    for block in range(n_blocks):
        Po = base + 1 if block < larger else base
        if Po == 3:
            _weight_grad_block(partial, x, dy, g, band, c, a, b, n0, ci, co, i, j0, j1,
                               outer_zeros(x, Pi, 3, row_bytes))
        elif Po == 2:
            _weight_grad_block(partial, x, dy, g, band, c, a, b, n0, ci, co, i, j0, j1,
                               outer_zeros(x, Pi, 2, row_bytes))
        else:
            _weight_grad_block(partial, x, dy, g, band, c, a, b, n0, ci, co, i, j0, j1,
                               outer_zeros(x, Pi, 1, row_bytes))
        co += Po


@njit(inline="always")
def _weight_grad_row(partial, x, dy, g, band, c, a, b, n0, i, j0, j1, row_bytes):
    """Every (input, output) channel block of tap (a, b) for the row of images from n0, pixels
    (i, j0..j1)."""
    n_blocks, base, larger = _channel_blocks(x.shape[3], MAX_OUTER_CHANNELS)
    ci = np.int64(0)
    for block in range(n_blocks):
        Pi = base + 1 if block < larger else base
        if Pi == 3:
            _weight_grad_outputs(partial, x, dy, g, band, c, a, b, n0, ci, i, j0, j1, 3, row_bytes)
        elif Pi == 2:
            _weight_grad_outputs(partial, x, dy, g, band, c, a, b, n0, ci, i, j0, j1, 2, row_bytes)
        else:
            _weight_grad_outputs(partial, x, dy, g, band, c, a, b, n0, ci, i, j0, j1, 1, row_bytes)
        ci += Pi


@njit(cache=True)
def _weight_grad_task(partial, x, dy, g, band, c, n0, n1):
    """Rows band·OUTER_BAND .. +OUTER_BAND of the image, images n0 <= n < n1 of chunk c (a
    multiple of 8 of them), every tap: the pixels in raster order by tiles of OUTER_TILE of a
    row, whose x and dy rows stay in cache while every tap and channel block passes over them;
    in each, wide rows of images, then 32-byte ones. Each lane sums the band's pixels in
    raster order whatever the tiles."""
    _, H, W, _, _ = x.shape
    k = partial.shape[3]
    lanes, tail = OUTER_ROW_BYTES // x.itemsize, OUTER_TAIL_BYTES // x.itemsize
    for i in range(band * OUTER_BAND, min(H, (band + 1) * OUTER_BAND)):
        for t0 in range(0, W, OUTER_TILE):
            for a in range(max(0, k - 1 - i), k):
                for b in range(k):
                    j0 = max(t0, k - 1 - b)
                    j1 = min(W, t0 + OUTER_TILE)
                    if j0 >= j1:
                        continue
                    n = n0
                    while n + lanes <= n1:
                        _weight_grad_row(partial, x, dy, g, band, c, a, b, n, i, j0, j1,
                                         OUTER_ROW_BYTES)
                        n += lanes
                    if OUTER_ROW_BYTES != OUTER_TAIL_BYTES:
                        while n + tail <= n1:
                            _weight_grad_row(partial, x, dy, g, band, c, a, b, n, i, j0, j1,
                                             OUTER_TAIL_BYTES)
                            n += tail


@njit(parallel=True, cache=True)
def weight_grad_partials(x, dy, k, chunk):
    """partial[g, band, c, a, b, ci, co, lane] = sum over the pixels of rows band·OUTER_BAND ..
    +OUTER_BAND of x[g, i-(k-1)+a, j-(k-1)+b, ci, n] · dy[g, i, j, co, n] for the image
    n = c·chunk + lane, in raster order: B and chunk multiples of 8. Parallel over (group,
    band, chunk): a fixed split, so the sums do not depend on the number of threads."""
    G, H, W, C_in, B = x.shape
    C_out = dy.shape[3]
    n_chunks = -(-B // chunk)
    n_bands = -(-H // OUTER_BAND)
    partial = np.zeros((G, n_bands, n_chunks, k, k, C_in, C_out, chunk), dtype=x.dtype)
    for t in prange(G * n_bands * n_chunks):
        g = t // (n_bands * n_chunks)
        band = (t // n_chunks) % n_bands
        c = t % n_chunks
        _weight_grad_task(partial, x, dy, g, band, c, c * chunk, min(B, (c + 1) * chunk))
    return partial


@njit(parallel=True, cache=True)
def sum_partials(partial):
    """dw[g, a, b, ci, co] = the sum of ``weight_grad_partials``'s partial[g, band, c, a, b, ci,
    co, lane] over the bands and chunks (lane by lane, in float64), then over the lanes, in that
    fixed order; one pass, parallel over (g, a, b, ci). NumPy's sum over the three non-adjacent
    axes took as long as the kernel itself (0.10-0.46 ms at the Emerging convolutions' shapes)."""
    G, n_bands, n_chunks, k, _, C_in, C_out, chunk = partial.shape
    dw = np.empty((G, k, k, C_in, C_out), dtype=partial.dtype)
    for t in prange(G * k * k * C_in):
        g = t // (k * k * C_in)
        a = (t // (k * C_in)) % k
        b = (t // C_in) % k
        ci = t % C_in
        lanes = np.zeros(chunk)
        for co in range(C_out):
            lanes[:] = 0.0
            for band in range(n_bands):
                for c in range(n_chunks):
                    row = partial[g, band, c, a, b, ci, co]
                    for lane in range(chunk):
                        lanes[lane] += row[lane]
            total = 0.0
            for lane in range(chunk):
                total += lanes[lane]
            dw[g, a, b, ci, co] = total
    return dw


@njit(parallel=True, cache=True)
def fma_probe_kernel(x, w, steps, threads):
    """``steps`` rounds of 8 × 64-byte fused multiply-adds in registers in each of ``threads``
    tasks on the Numba threads (8 independent chains on one row of x: nothing but the FMA
    units): bench/invconv.py's probe of the rate the machine gives. Returns the sums, so that
    nothing is optimized away."""
    out = np.zeros((threads, 8 * x.shape[0]), dtype=x.dtype)
    for t in prange(threads):
        acc = block_zeros(x, 8, BLOCK_BYTES)
        for _ in range(steps):
            acc = block_fma(acc, x, 0, w, 0)
        block_store(acc, out[t], 0, x.shape[0])
    return out
