"""ReLU: y = max(x, 0); backward dx = dy where x > 0, else 0. Any shape and layout (the
coupling networks use it on channel-last images); no parameters.

It caches its *output* y, not a mask: y > 0 exactly where x > 0 (NaN included: neither), and in
a coupling network y is the next convolution's input, which that conv caches anyway, so the
ReLU's cache costs no memory of its own.

``forward_bias`` / ``backward_bias`` are the fused forms Network uses (nfcore/nn/fused.py): the
preceding conv's bias added and the rectifier applied in one pass, in place on the conv's fresh
output; backward masks dy and sums it into the bias gradient in one pass.
"""
from ..layers.base import Layer, check_gradient
from .fused import bias_relu, relu_backward_bias


class ReLU(Layer):
    """The rectifier of the coupling networks. Caches its output for backward's mask."""

    def forward(self, x):
        y = x * (x > 0)
        self._cache = y
        return y

    def backward(self, dy):
        out = getattr(self, "_cache", None)
        check_gradient(dy, None if out is None else out.shape)
        return dy * (out > 0)

    def forward_bias(self, y, bias=None):
        """max(y + bias, 0), in place on y (a fresh array of the caller's: a conv's output);
        bias (channels,) along the last axis, or None."""
        y = bias_relu(y, bias)
        self._cache = y
        return y

    def backward_bias(self, dy):
        """(dx, dbias): dx = dy · (y > 0) (in place on dy, a fresh array of the caller's: a
        conv's dx), dbias (channels,) = dx summed over every other axis."""
        out = getattr(self, "_cache", None)
        check_gradient(dy, None if out is None else out.shape)
        return relu_backward_bias(dy, out)
