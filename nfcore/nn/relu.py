"""ReLU: y = max(x, 0); backward dx = dy where x > 0, else 0. Any shape and layout (the
coupling networks use it on channel-last images); no parameters."""
from ..layers.base import Layer, check_gradient


class ReLU(Layer):
    """The rectifier of the coupling networks. Caches the mask x > 0 for backward."""

    def forward(self, x):
        self._cache = x > 0
        return x * self._cache

    def backward(self, dy):
        mask = getattr(self, "_cache", None)
        check_gradient(dy, None if mask is None else mask.shape)
        return dy * mask
