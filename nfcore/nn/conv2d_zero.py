"""Conv2dZero: Glow's zero-initialized last convolution of a coupling network.

Channel-last, like Conv2d: x (B, H, W, C) -> y (B, H, W, O); weight (O, C, k, k), bias (O,),
logs (O,)::

    u = conv(x, weight) + bias                    (Conv2d, same padding)
    y = u * exp(3 · logs)                          (per output channel: the last axis)

All three parameters start at zero, so the network's output starts at zero (a coupling starts
as a fixed scaling, a split prior as the standard normal). The factor 3 (Glow's
``logscale_factor``) lets the output scale grow three times faster than logs' own step.

Backward, with e = exp(3 · logs) (O,)::

    dlogs = 3 · e · sum_{n,i,j} dy · u
    du    = dy · e          then Conv2d's backward gives dx, dweight, dbias
"""
import numpy as np

from ..backend import get_array_module
from ..layers.base import check_gradient
from .conv2d import Conv2d
from .fused import scale_bias, scale_bias_backward

LOGSCALE_FACTOR = 3.0


class Conv2dZero(Conv2d):
    """Zero-initialized k×k conv with a learned output scale. params: "weight", "bias", "logs"."""

    def __init__(self, out_channels, kernel_size=3, in_channels=None, dtype=None):
        super().__init__(out_channels, kernel_size, in_channels, bias=True, dtype=dtype, seed=0)

    def _initial_params(self, in_channels, rng):
        O, k = self.out_channels, self.k
        return {"weight": np.zeros((O, in_channels, k, k)), "bias": np.zeros(O), "logs": np.zeros(O)}

    def _scale(self, dtype):
        """(O,) exp(3 · logs) in the given dtype: broadcasts along the channel-last axis."""
        logs = self.params["logs"].astype(dtype, copy=False)
        return get_array_module(logs).exp(LOGSCALE_FACTOR * logs)

    def forward(self, x):
        """y = (conv(x) + bias) · exp(3 · logs); u = conv(x) + bias kept for backward. The bias
        and the scale are one fused pass (nfcore/nn/fused.py) over the product's output."""
        g = self.forward_linear(x)
        u, y = scale_bias(g, self.params["bias"].astype(g.dtype, copy=False), self._scale(g.dtype))
        self._u = u
        return y

    def release(self):
        super().release()
        self._u = None

    def backward(self, dy):
        """du = dy · e, dlogs = 3 · Σ du · u, dbias = Σ du (one fused pass), then the conv's."""
        cached = getattr(self, "_cache", None) is not None
        check_gradient(dy, self._u.shape if cached else None)
        u = self._u
        du, logs_sum, bias_sum = scale_bias_backward(dy.astype(u.dtype, copy=False), u,
                                                     self._scale(u.dtype))
        self.grads["logs"] += LOGSCALE_FACTOR * logs_sum
        self.grads["bias"] += bias_sum
        return self.backward_linear(du)
