"""Logit: the logit preprocessing of RealNVP as a flow layer, with its log-determinant.

Shapes: x, y (B, C, H, W); x in [-0.5, 0.5] (dequantized images, the objective in docs/design.md)::

    p      = alpha + (1 - 2·alpha) · (x + 0.5)         in [alpha, 1 - alpha]
    y      = log p - log(1 - p)
    logdet = sum_{c,i,j} log(1 - 2·alpha) - log p - log(1 - p)
    x      = (sigmoid(y) - alpha) / (1 - 2·alpha) - 0.5         (inverse; any real y)

alpha > 0 keeps y finite at the ends of the range (RealNVP uses 0.05). Backward::

    dx = dy · (1 - 2·alpha) / (p (1 - p))  +  dlogdet · (1 - 2·alpha) · (1/(1 - p) - 1/p)

Inputs outside [-0.5, 0.5] raise ValueError. No parameters.
"""
import math

from ..backend import get_array_module
from .base import Layer, check_gradient, check_images


class Logit(Layer):
    """y = logit(alpha + (1 - 2·alpha)(x + 0.5)), for x in [-0.5, 0.5]."""

    def __init__(self, alpha=0.05):
        super().__init__()
        if not 0 < alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
        self.alpha = alpha

    def _p(self, x):
        return self.alpha + (1 - 2 * self.alpha) * (x + 0.5)

    def forward(self, x):
        check_images(x, "x")
        xp = get_array_module(x)
        if bool((x < -0.5).any()) or bool((x > 0.5).any()):
            raise ValueError(f"Logit needs inputs in [-0.5, 0.5], got values in "
                             f"[{float(x.min())}, {float(x.max())}]")
        p = self._p(x)
        log_p, log_1mp = xp.log(p), xp.log1p(-p)
        self._cache = p
        logdet = (math.log(1 - 2 * self.alpha) - log_p - log_1mp).reshape(x.shape[0], -1).sum(axis=1)
        return log_p - log_1mp, logdet

    def inverse(self, y):
        check_images(y, "y")
        xp = get_array_module(y)
        p = xp.exp(-xp.logaddexp(0, -y))               # sigmoid(y), no overflow
        return (p - self.alpha) / (1 - 2 * self.alpha) - 0.5

    def backward(self, dy, dlogdet):
        p = getattr(self, "_cache", None)
        check_gradient(dy, None if p is None else p.shape)
        a = 1 - 2 * self.alpha
        g = dlogdet.astype(p.dtype, copy=False)[:, None, None, None]
        return dy * a / (p * (1 - p)) + g * a * (1 / (1 - p) - 1 / p)
