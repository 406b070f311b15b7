"""Conv2d: the k×k convolution of the coupling networks (stride 1, "same" zero padding, bias).

Channel-last: x (B, H, W, C) -> y (B, H, W, O). The parameters keep the usual layout, weight
(O, C, k, k) and bias (O,) (checkpoints and PyTorch's conv2d use it). k odd, p = k // 2::

    y[n, i, j, o] = bias[o] + sum_{a, b, c} weight[o, c, a, b] * x[n, i - p + a, j - p + b, c]

(x is zero outside the image). Every product below is one matrix product (GEMM) whose rows are
the B·H·W pixels, on contiguous matrices: with channel-last images, x is already the matrix
(B·H·W, C) and y the matrix (B·H·W, O), so no array is copied to transpose it.

**Expanding the input side** (C <= O), with im2col's patch matrix (nfcore/nn/patches.py)::

    cols    = im2col(x)                  (B·H·W, k·k·C): row = a pixel's patch, columns (a, b, c)
    Wmat    = weight as (k·k·C, O),      Wmat[(a, b, c), o] = weight[o, c, a, b]
    y       = cols @ Wmat                (B·H·W, O)
    dweight = dy^T @ cols                (O, k·k·C), back to (O, C, k, k)
    dx      = col2im(dy @ Wmat^T)        (B·H·W, k·k·C) summed back into (B, H, W, C)

**Expanding the output side** (C > O). cols holds k·k·C values per pixel: cheap for the first
conv of a coupling network (a few channels in, 512 out), wasteful for its last one (512 in, a
few out). There the product comes first and the k·k taps are summed after it; col2im is that
shifted sum, with the taps reversed::

    V       = weight as (C, k·k·O),      V[c, (a, b, o)] = weight[o, c, k-1-a, k-1-b]
    Z       = x @ V                      (B·H·W, k·k·O): every tap's contribution of every pixel
    y       = col2im(Z)                  y[n,i,j,o] = sum_{a,b} Z[(n, i+p-a, j+p-b), (a, b, o)]
                                         = sum_{a',b',c} weight[o,c,a',b'] x[n, i-p+a', j-p+b', c]
                                         (a' = k-1-a, b' = k-1-b: V's reversal undoes col2im's)
    dZ      = im2col(dy)                 (B·H·W, k·k·O): im2col is col2im's transpose
    dV      = x^T @ dZ                   (C, k·k·O), back to (O, C, k, k)
    dx      = dZ @ V^T                   (B·H·W, C)

so the expanded matrices have k·k·min(C, O) columns either way. For k = 1 both are the same
single product (im2col and col2im are reshapes). dbias = sum of dy over its B·H·W rows.

Expanding the smaller side still wins at every shape of the coupling networks. Measured on the
2-core CPU (float32, 3×3, forward + backward, BLAS and Numba on 2 threads, best of 10, in ms)::

    B = 16, 16×16    6 -> 512    input side  11.0    output side  90.0
    B = 16, 16×16  512 -> 12     input side 122.3    output side  13.9
    B = 64, 16×16    6 -> 64     input side   7.4    output side  42.9
    B = 64, 16×16   64 -> 12     input side  65.6    output side  11.6
    B = 64,  8×8    64 -> 24     input side   5.9    output side   4.2
    B = 64,  4×4    24 -> 64     input side   1.1    output side   1.3
    B = 16,  4×4   512 -> 48     input side   5.1    output side   4.4

**The direct convolutions** (conv2d_direct.py) replace these products for the forward and the
input gradient of a k×k convolution (k > 1) of NumPy arrays: register-blocked kernels with no
patch matrix, one for outputs that fill the SIMD rows, one by the output side for narrow
outputs (``conv2d_direct.method`` chooses, by measurement), 1.1-1.8× faster at the coupling
networks' shapes. The products remain for the weight gradient (a sum over every pixel, a
GEMM's best shape), for 1×1 convolutions and CuPy arrays, and as the direct kernels'
reference (``DIRECT = False``).

Only x is cached: the patch matrix is rebuilt in backward, as it is up to k² times larger than
x, and a flow of many couplings would otherwise hold all of them at once. The weight's two GEMM
layouts are small rearranged copies made in each forward and backward.
Not invertible: forward(x) -> y and backward(dy) -> dx only.
"""
import numba
import numpy as np

from ..backend import default_array_module, get_array_module, is_cupy_array
from ..layers.base import Layer, check_gradient
from . import conv2d_direct as direct
from .patches import col2im, col2im_into, im2col, im2col_into

# Blocking (NumPy arrays, Numba on one thread): the expanded matrix (im2col's cols, or the
# output side's Z / dZ) of a whole batch is B·H·W·k²·min(C, O) values, 11 MB at B = 100, 16×16,
# 64 -> 12 (sampling), written once and read once from main memory. Built and consumed a few
# images at a time, in a reused buffer of about BLOCK_BYTES, it stays in the cache (L2) between
# the Numba kernel and the product. Measured on the 2-core machine under load 5-6 (new / old,
# 9 alternations in one process, median and range): sampling 100 images of the small model on
# one thread 0.87 (0.75-1.00) glow1x1, 0.90 (0.62-1.01) finc; a train step on one thread 0.88
# (0.80-1.03). On two threads a train step took 1.18-1.23 times as long, with outliers of 5-12×:
# every block is one more Numba parallel region and one more threaded product, each a
# synchronization of the two threads, which a loaded machine makes expensive. Hence blocks only
# while Numba runs on at most BLOCK_THREADS threads. BLOCK_BYTES None: never (one block, the
# whole batch, as CuPy arrays always do).
BLOCK_BYTES = 512 * 1024
BLOCK_THREADS = 1
# The direct convolutions (conv2d_direct.py) for k > 1, as ``direct.method`` chooses; False:
# the im2col products everywhere (their reference).
DIRECT = True


def input_side_weight(weight):
    """Wmat (k·k·C, O) from weight (O, C, k, k): Wmat[(a, b, c), o] = weight[o, c, a, b]."""
    O, C, k, _ = weight.shape
    return weight.transpose(2, 3, 1, 0).reshape(k * k * C, O)


def output_side_weight(weight):
    """V (C, k·k·O) from weight (O, C, k, k): V[c, (a, b, o)] = weight[o, c, k-1-a, k-1-b]."""
    O, C, k, _ = weight.shape
    return weight[:, :, ::-1, ::-1].transpose(1, 2, 3, 0).reshape(C, k * k * O)


def images_per_block(x, columns):
    """How many images of x (B, H, W, ·) make a block whose expanded matrix (H·W rows of
    ``columns`` values per image) holds about BLOCK_BYTES; B (one block) for CuPy arrays, for
    BLOCK_BYTES None, with Numba on more than BLOCK_THREADS threads, or when everything fits."""
    B, H, W = x.shape[:3]
    if BLOCK_BYTES is None or is_cupy_array(x) or numba.get_num_threads() > BLOCK_THREADS:
        return B
    return int(min(B, max(1, BLOCK_BYTES // (H * W * columns * x.itemsize))))


def _blocks(B, n):
    return [(lo, min(B, lo + n)) for lo in range(0, B, n)]


def conv_forward_input_side(x, weight):
    """y (B, H, W, O) = cols @ Wmat, cols = im2col(x) (B·H·W, k·k·C), block by block."""
    B, H, W, C = x.shape
    O, k = weight.shape[0], weight.shape[2]
    Wmat = input_side_weight(weight)
    n = images_per_block(x, k * k * C) if k > 1 else B
    if n >= B:
        return (im2col(x, k) @ Wmat).reshape(B, H, W, O)
    HW = H * W
    y = np.empty((B * HW, O), dtype=x.dtype)
    buffer = np.empty((n * HW, k * k * C), dtype=x.dtype)
    for lo, hi in _blocks(B, n):
        cols = im2col_into(x[lo:hi], k, buffer[:(hi - lo) * HW])
        np.matmul(cols, Wmat, out=y[lo * HW:hi * HW])
    return y.reshape(B, H, W, O)


def conv_backward_input_side(dy, x, weight, input_grad=True):
    """(dx (B, H, W, C), dweight (O, C, k, k)): dweight = dy^T @ cols, dx = col2im(dy @ Wmat^T),
    block by block (dweight summed over the blocks). dx None without ``input_grad``."""
    B, H, W, O = dy.shape
    C, k = weight.shape[1], weight.shape[2]
    dy = dy.reshape(B * H * W, O)
    Wmat = input_side_weight(weight)
    n = images_per_block(x, k * k * C) if k > 1 else B
    if n >= B:
        dweight = (dy.T @ im2col(x, k)).reshape(O, k, k, C).transpose(0, 3, 1, 2)
        dx = col2im(dy @ Wmat.T, x.shape, k) if input_grad else None
        return dx, dweight
    HW = H * W
    dW = np.zeros((O, k * k * C), dtype=x.dtype)
    dx = np.empty(x.shape, dtype=x.dtype) if input_grad else None
    buffer = np.empty((n * HW, k * k * C), dtype=x.dtype)
    expanded = np.empty_like(buffer)
    for lo, hi in _blocks(B, n):
        rows = slice(lo * HW, hi * HW)
        cols = im2col_into(x[lo:hi], k, buffer[:(hi - lo) * HW])
        dW += dy[rows].T @ cols
        if input_grad:
            col2im_into(np.matmul(dy[rows], Wmat.T, out=expanded[:(hi - lo) * HW]), dx[lo:hi], k)
    return dx, dW.reshape(O, k, k, C).transpose(0, 3, 1, 2)


def conv_forward_output_side(x, weight):
    """y (B, H, W, O) = col2im(x @ V), x as (B·H·W, C), V (C, k·k·O), block by block."""
    B, H, W, C = x.shape
    O, k = weight.shape[0], weight.shape[2]
    V = output_side_weight(weight)
    x2 = x.reshape(B * H * W, C)
    n = images_per_block(x, k * k * O) if k > 1 else B
    if n >= B:
        return col2im(x2 @ V, (B, H, W, O), k)
    HW = H * W
    y = np.empty((B, H, W, O), dtype=x.dtype)
    buffer = np.empty((n * HW, k * k * O), dtype=x.dtype)
    for lo, hi in _blocks(B, n):
        col2im_into(np.matmul(x2[lo * HW:hi * HW], V, out=buffer[:(hi - lo) * HW]), y[lo:hi], k)
    return y


def conv_backward_output_side(dy, x, weight, input_grad=True):
    """(dx, dweight): dZ = im2col(dy), dV = x^T @ dZ, dx = dZ @ V^T, block by block (dV summed
    over the blocks). dx None without ``input_grad``."""
    B, H, W, C = x.shape
    O, k = weight.shape[0], weight.shape[2]
    x2 = x.reshape(B * H * W, C)
    V = output_side_weight(weight)
    n = images_per_block(x, k * k * O) if k > 1 else B
    if n >= B:
        dZ = im2col(dy, k)                                      # (B·H·W, k·k·O)
        dV = x2.T @ dZ                                          # dV[c, (a, b, o)]
        dx = (dZ @ V.T).reshape(B, H, W, C) if input_grad else None
    else:
        HW = H * W
        dV = np.zeros((C, k * k * O), dtype=x.dtype)
        dx = np.empty((B * HW, C), dtype=x.dtype) if input_grad else None
        buffer = np.empty((n * HW, k * k * O), dtype=x.dtype)
        for lo, hi in _blocks(B, n):
            rows = slice(lo * HW, hi * HW)
            dZ = im2col_into(dy[lo:hi], k, buffer[:(hi - lo) * HW])
            dV += x2[rows].T @ dZ
            if input_grad:
                np.matmul(dZ, V.T, out=dx[rows])
        dx = dx.reshape(B, H, W, C) if input_grad else None
    dweight = dV.reshape(C, k, k, O)[:, ::-1, ::-1, :].transpose(3, 0, 1, 2)   # V's layout undone
    return dx, dweight


def check_channel_last(x, name="x", channels=None):
    """Raise a clear error unless x is a float32/float64 (B, H, W, C) array with no empty axis
    and, when given, ``channels`` channels (its last axis)."""
    if not hasattr(x, "ndim") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be a NumPy or CuPy array, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have 4 dimensions (batch, height, width, channels: "
                         f"channel-last), got shape {tuple(x.shape)}")
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    if 0 in x.shape:
        raise ValueError(f"{name} has an empty dimension: shape {tuple(x.shape)}")
    if channels is not None and x.shape[3] != channels:
        raise ValueError(f"{name} has {x.shape[3]} channels (last axis) but the layer was "
                         f"built for {channels}")


class Conv2d(Layer):
    """k×k convolution of channel-last images, stride 1, same padding.

    params: "weight" (O, C, k, k), "bias" (O,). The weight is created on first use from the
    input's channel count when ``in_channels`` is None: He-normal, std sqrt(2 / (C·k·k)),
    seeded; the bias starts at zero.
    """

    def __init__(self, out_channels, kernel_size=3, in_channels=None, bias=True, dtype=None, seed=0):
        super().__init__()
        if not isinstance(kernel_size, (int, np.integer)) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer (same padding), got {kernel_size!r}")
        if not isinstance(out_channels, (int, np.integer)) or out_channels < 1:
            raise ValueError(f"out_channels must be a positive integer, got {out_channels!r}")
        self.out_channels = int(out_channels)
        self.k = int(kernel_size)
        self.bias = bias
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.seed = seed
        self.channels = None
        if in_channels is not None:
            self._build(in_channels, default_array_module(), self.dtype or np.float32)

    def _initial_params(self, in_channels, rng):
        """NumPy float64 starting values of the parameters (Conv2dZero overrides this)."""
        fan_in = in_channels * self.k * self.k
        shape = (self.out_channels, in_channels, self.k, self.k)
        params = {"weight": rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)}
        if self.bias:
            params["bias"] = np.zeros(self.out_channels)
        return params

    def _build(self, in_channels, xp, dtype):
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        rng = np.random.default_rng(self.seed)
        self.channels = int(in_channels)
        self.params = {name: xp.asarray(value, dtype=dtype)
                       for name, value in self._initial_params(self.channels, rng).items()}
        self.zero_grad()

    def _expand_input(self):
        """True: expand the input side (k·k·C columns), else the output side (k·k·O)."""
        return self.channels <= self.out_channels

    def _direct_method(self, x, n_in, n_out):
        """"direct", "output_side" (the kernels of conv2d_direct.py) or None (the im2col
        products: CuPy arrays, 1×1 convolutions, ``DIRECT`` False) for a convolution of x's
        dtype from n_in to n_out channels (``direct.method``)."""
        if not DIRECT or self.k == 1 or is_cupy_array(x):
            return None
        return direct.method(n_in, n_out, x.itemsize)

    def forward_linear(self, x):
        """The convolution of x (B, H, W, C) without the bias: a fresh array y (B, H, W, O),
        which the caller may change in place (Network adds the bias inside its fused ReLU,
        Conv2dZero inside its fused scaling). Caches x for backward."""
        check_channel_last(x, "x", self.channels)
        xp = get_array_module(x)
        if self.channels is None:
            self._build(x.shape[3], xp, self.dtype or x.dtype)
        x = xp.ascontiguousarray(x)
        weight = self.params["weight"].astype(x.dtype, copy=False)
        method = self._direct_method(x, self.channels, self.out_channels)
        if method == "direct":
            y = direct.conv2d_direct(x, weight)
        elif method == "output_side":
            y = direct.conv2d_direct_output_side(x, weight)
        elif self._expand_input():
            y = conv_forward_input_side(x, weight)
        else:
            y = conv_forward_output_side(x, weight)
        self._cache = x
        return y

    def forward(self, x):
        """y (B, H, W, O) = the convolution of x (B, H, W, C), plus the bias."""
        y = self.forward_linear(x)
        if self.bias:
            y += self.params["bias"].astype(y.dtype, copy=False)
        return y

    def backward_linear(self, dy):
        """dx (B, H, W, C) from dy (B, H, W, O); adds dL/dweight into grads, not dL/dbias (the
        caller's fused pass computes that one: see Network, Conv2dZero)."""
        x = getattr(self, "_cache", None)
        check_gradient(dy, None if x is None else x.shape[:3] + (self.out_channels,))
        dy = get_array_module(x).ascontiguousarray(dy, dtype=x.dtype)
        weight = self.params["weight"].astype(x.dtype, copy=False)
        method = self._direct_method(x, self.out_channels, self.channels)   # dy -> dx
        if self._expand_input():
            dx, dweight = conv_backward_input_side(dy, x, weight, input_grad=method is None)
        else:
            dx, dweight = conv_backward_output_side(dy, x, weight, input_grad=method is None)
        if method == "direct":
            dx = direct.conv2d_direct_input_grad(dy, weight)
        elif method == "output_side":
            dx = direct.conv2d_direct_output_side_input_grad(dy, weight)
        self.grads["weight"] += dweight
        return dx

    def backward(self, dy):
        """dx (B, H, W, C) from dy (B, H, W, O); adds dL/dweight and dL/dbias into grads."""
        dx = self.backward_linear(dy)
        if self.bias:
            self.grads["bias"] += dy.reshape(-1, self.out_channels).sum(axis=0)
        return dx
