"""Conv2dZero: Glow's zero-initialized last convolution of a coupling network.

Shapes: x (B, C, H, W) -> y (B, O, H, W); weight (O, C, k, k), bias (O,), logs (O,)::

    u = conv(x, weight) + bias                    (Conv2d, same padding)
    y = u * exp(3 · logs)                          (per output channel)

All three parameters start at zero, so the network's output starts at zero (a coupling starts
as a fixed scaling, a split prior as the standard normal). The factor 3 (Glow's
``logscale_factor``) lets the output scale grow three times faster than logs' own step.

Backward, with e = exp(3 · logs)::

    dlogs = 3 · e · sum_{n,i,j} dy · u
    du    = dy · e          then Conv2d's backward gives dx, dweight, dbias
"""
import numpy as np

from ..backend import get_array_module
from ..layers.base import check_gradient
from .conv2d import Conv2d

LOGSCALE_FACTOR = 3.0


class Conv2dZero(Conv2d):
    """Zero-initialized k×k conv with a learned output scale. params: "weight", "bias", "logs"."""

    def __init__(self, out_channels, kernel_size=3, in_channels=None, dtype=None):
        super().__init__(out_channels, kernel_size, in_channels, bias=True, dtype=dtype, seed=0)

    def _initial_params(self, in_channels, rng):
        O, k = self.out_channels, self.k
        return {"weight": np.zeros((O, in_channels, k, k)), "bias": np.zeros(O), "logs": np.zeros(O)}

    def _scale(self, dtype):
        """(1, O, 1, 1) exp(3 · logs) in the given dtype."""
        logs = self.params["logs"].astype(dtype, copy=False)
        return get_array_module(logs).exp(LOGSCALE_FACTOR * logs)[None, :, None, None]

    def forward(self, x):
        u = super().forward(x)
        self._u = u
        return u * self._scale(u.dtype)

    def release(self):
        super().release()
        self._u = None

    def backward(self, dy):
        cached = getattr(self, "_cache", None) is not None
        check_gradient(dy, self._u.shape if cached else None)
        u = self._u
        dy = dy.astype(u.dtype, copy=False)
        scale = self._scale(u.dtype)
        dlogs = LOGSCALE_FACTOR * (dy * u * scale).sum(axis=(0, 2, 3))
        self.grads["logs"] += dlogs.astype(self.grads["logs"].dtype)
        return super().backward(dy * scale)
