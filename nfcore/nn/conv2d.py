"""Conv2d: the k×k convolution of the coupling networks (stride 1, "same" zero padding, bias).

Shapes: x (B, C, H, W) -> y (B, O, H, W); weight (O, C, k, k); bias (O,). k odd, p = k // 2::

    y[n, o, i, j] = bias[o] + sum_{c, a, b} weight[o, c, a, b] * x[n, c, i - p + a, j - p + b]

(x is zero outside the image). Computed as one matrix product, im2col::

    cols = im2col(x)                   (C·k·k, B·H·W): column (n, i, j) is the k×k patch at (i, j)
    y    = weight.reshape(O, C·k·k) @ cols  -> (O, B·H·W) -> (B, O, H, W)

Backward, with dy (B, O, H, W) flattened the same way to (O, B·H·W)::

    dweight = dy @ cols.T              (O, C·k·k)
    dbias   = sum of dy over n, i, j
    dx      = col2im(weight.T @ dy)    col2im adds each column back into the pixels it came from

Only x is cached, and ``cols`` is rebuilt in backward: cols is k² times larger than x (for the
last 3×3 conv of a width-512 network, 9·512 values per pixel per image), and a flow of many
couplings would otherwise hold all of them at once. Rebuilding costs a copy, not a product.

Measured on the 2-core CPU (float32, B=16, 16×16, NumPy + OpenBLAS): im2col + one matrix
product is faster than summing k² per-tap products (see the note in nfcore/nn/__init__.py).
Not invertible: forward(x) -> y and backward(dy) -> dx only.
"""
import numpy as np

from ..backend import default_array_module, get_array_module
from ..layers.base import Layer, check_images


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

    def forward(self, x):
        """y (B, O, H, W) = the convolution of x (B, C, H, W), plus the bias."""
        check_images(x, "x", self.channels, finite=False)
        xp = get_array_module(x)
        if self.channels is None:
            self._build(x.shape[1], xp, self.dtype or x.dtype)
        B, C, H, W = x.shape
        weight = self.params["weight"].astype(x.dtype, copy=False).reshape(self.out_channels, -1)
        y = (weight @ im2col(x, self.k)).reshape(self.out_channels, B, H, W)
        y = xp.ascontiguousarray(y.transpose(1, 0, 2, 3))
        if self.bias:
            y += self.params["bias"].astype(x.dtype, copy=False)[None, :, None, None]
        self._cache = x
        return y

    def backward(self, dy):
        """dx (B, C, H, W) from dy (B, O, H, W); adds dL/dweight and dL/dbias into grads."""
        x = getattr(self, "_cache", None)
        if x is None:
            raise RuntimeError("backward called before forward")
        B, C, H, W = x.shape
        if dy.shape != (B, self.out_channels, H, W):
            raise ValueError(f"dy has shape {tuple(dy.shape)}, forward's output had "
                             f"{(B, self.out_channels, H, W)}")
        dy = dy.astype(x.dtype, copy=False)
        dy_flat = dy.transpose(1, 0, 2, 3).reshape(self.out_channels, B * H * W)
        weight = self.params["weight"].astype(x.dtype, copy=False).reshape(self.out_channels, -1)
        dweight = self.grads["weight"]
        dweight += (dy_flat @ im2col(x, self.k).T).reshape(dweight.shape).astype(dweight.dtype)
        if self.bias:
            self.grads["bias"] += dy.sum(axis=(0, 2, 3)).astype(self.grads["bias"].dtype)
        return col2im(weight.T @ dy_flat, x.shape, self.k)
