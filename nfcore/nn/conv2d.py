"""Conv2d: the k×k convolution of the coupling networks (stride 1, "same" zero padding, bias).

Shapes: x (B, C, H, W) -> y (B, O, H, W); weight (O, C, k, k); bias (O,). k odd, p = k // 2::

    y[n, o, i, j] = bias[o] + sum_{c, a, b} weight[o, c, a, b] * x[n, c, i - p + a, j - p + b]

(x is zero outside the image). Computed with im2col and one matrix product, written with
images flattened to (channels, B·H·W)::

    cols    = im2col(x)                 (C·k·k, B·H·W): column (n, i, j) is the patch at (i, j)
    y       = weight.reshape(O, C·k·k) @ cols                              ``correlate``
    dx      = col2im(weight.reshape(O, C·k·k).T @ dy)                      ``correlate_transpose``
    dweight = dy @ cols.T                                                  ``weight_grad``
    dbias   = sum of dy over n, i, j

col2im is im2col's transpose: it adds each column back into the pixels its patch came from.

**Which side is expanded.** cols holds C·k² values per pixel: cheap for the first conv of a
coupling network (C = a few channels in, 512 out), wasteful for its last one (512 in, a few
out). The same convolution is also the *transposed* convolution of the flipped kernel
V = flip(weight) (C, O, k, k), V[c, o, a, b] = weight[o, c, k-1-a, k-1-b]; in that form every
product expands the O side instead::

    y       = correlate_transpose(x, V)       dx = correlate(dy, V)
    dweight = flip(weight_grad(dy, x))        (x takes dy's place: dV, flipped back)

so Conv2d expands whichever of C and O is smaller. Measured on the 2-core CPU (NumPy +
OpenBLAS, float32, B=16, 16×16, forward + backward, best of 5):

    6 -> 512, 3×3      im2col 7 ms     summing k² per-tap products 24 ms
    512 -> 12, 3×3     im2col 100 ms   output side 9 ms                per-tap products 54 ms
    512 -> 512, 1×1    im2col 27 ms    per-tap products 27 ms (k = 1: the same product)

A batched layout (B, C·k², H·W) with one product per image, which saves the transposes, was
within ±15% of this one either way, so the single large product stays.

Only x is cached, and the expansion is rebuilt in backward: it is up to k² times larger than x,
and a flow of many couplings would otherwise hold all of them at once.
Not invertible: forward(x) -> y and backward(dy) -> dx only.
"""
import numpy as np

from ..backend import default_array_module, get_array_module
from ..layers.base import Layer, check_gradient, check_images


def im2col(x, k):
    """(B, C, H, W) -> (C·k·k, B·H·W): row (c, a, b), column (n, i, j) = x[n, c, i-p+a, j-p+b]."""
    xp = get_array_module(x)
    B, C, H, W = x.shape
    p = k // 2
    x_padded = xp.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    cols = xp.empty((C, k, k, B, H, W), dtype=x.dtype)
    for a in range(k):
        for b in range(k):
            cols[:, a, b] = x_padded[:, :, a:a + H, b:b + W].transpose(1, 0, 2, 3)
    return cols.reshape(C * k * k, B * H * W)


def col2im(cols, shape, k):
    """The transpose of im2col: (C·k·k, B·H·W) -> (B, C, H, W), overlapping patches summed."""
    xp = get_array_module(cols)
    B, C, H, W = shape
    p = k // 2
    cols = cols.reshape(C, k, k, B, H, W)
    x_padded = xp.zeros((B, C, H + 2 * p, W + 2 * p), dtype=cols.dtype)
    for a in range(k):
        for b in range(k):
            x_padded[:, :, a:a + H, b:b + W] += cols[:, a, b].transpose(1, 0, 2, 3)
    return x_padded[:, :, p:p + H, p:p + W]


def _flat(x):
    """(B, C, H, W) -> (C, B·H·W)."""
    return x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1)


def _image(y, B, H, W):
    """(O, B·H·W) -> (B, O, H, W), contiguous."""
    return get_array_module(y).ascontiguousarray(y.reshape(-1, B, H, W).transpose(1, 0, 2, 3))


def flip(w):
    """(O, C, k, k) -> (C, O, k, k): channels swapped, taps reversed. flip(flip(w)) = w."""
    return w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)


def correlate(x, w):
    """y (B, O, H, W) = sum_{c,a,b} w[o, c, a, b] x[n, c, i-p+a, j-p+b]; expands x (C·k² rows)."""
    B, C, H, W = x.shape
    return _image(w.reshape(w.shape[0], -1) @ im2col(x, w.shape[2]), B, H, W)


def correlate_transpose(dy, w):
    """The transpose of ``correlate(·, w)`` applied to dy (B, O, H, W) -> (B, C, H, W)."""
    B, _, H, W = dy.shape
    O, C, k, _ = w.shape
    return col2im(w.reshape(O, -1).T @ _flat(dy), (B, C, H, W), k)


def weight_grad(x, dy, k):
    """dw (O, C, k, k) = sum_{n,i,j} dy[n, o, i, j] x[n, c, i-p+a, j-p+b]; expands x."""
    O, C = dy.shape[1], x.shape[1]
    return (_flat(dy) @ im2col(x, k).T).reshape(O, C, k, k)


class Conv2d(Layer):
    """k×k convolution, stride 1, same padding. params: "weight" (O, C, k, k), "bias" (O,).

    The weight is created on first use from the input's channel count when ``in_channels`` is
    None: He-normal, std sqrt(2 / (C·k·k)), seeded; the bias starts at zero.
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
        """True: expand the input side (C·k² rows), else the output side (O·k²)."""
        return self.channels <= self.out_channels

    def forward(self, x):
        """y (B, O, H, W) = the convolution of x (B, C, H, W), plus the bias."""
        check_images(x, "x", self.channels, finite=False)
        if self.channels is None:
            self._build(x.shape[1], get_array_module(x), self.dtype or x.dtype)
        weight = self.params["weight"].astype(x.dtype, copy=False)
        if self._expand_input():
            y = correlate(x, weight)
        else:
            y = correlate_transpose(x, flip(weight))
        if self.bias:
            y += self.params["bias"].astype(x.dtype, copy=False)[None, :, None, None]
        self._cache = x
        return y

    def backward(self, dy):
        """dx (B, C, H, W) from dy (B, O, H, W); adds dL/dweight and dL/dbias into grads."""
        x = getattr(self, "_cache", None)
        B, C, H, W = x.shape if x is not None else (None,) * 4
        check_gradient(dy, None if x is None else (B, self.out_channels, H, W))
        dy = dy.astype(x.dtype, copy=False)
        weight = self.params["weight"].astype(x.dtype, copy=False)
        if self._expand_input():
            dweight = weight_grad(x, dy, self.k)
            dx = correlate_transpose(dy, weight)
        else:
            dweight = flip(weight_grad(dy, x, self.k))
            dx = correlate(dy, flip(weight))
        self.grads["weight"] += dweight.astype(self.grads["weight"].dtype, copy=False)
        if self.bias:
            self.grads["bias"] += dy.sum(axis=(0, 2, 3)).astype(self.grads["bias"].dtype)
        return dx
