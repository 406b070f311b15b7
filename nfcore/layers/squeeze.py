"""Squeeze: space-to-depth, each 2×2 block of pixels becomes 4 channels. No parameters.

Shapes: x (B, C, H, W) -> y (B, 4C, H/2, W/2); H and W must be even::

    y[n, 4c + 2·di + dj, i, j] = x[n, c, 2i + di, 2j + dj]        di, dj in {0, 1}

so input channel c becomes the four consecutive output channels 4c .. 4c+3, in the order
top-left, top-right, bottom-left, bottom-right of each 2×2 block (Glow's ``squeeze2d`` in NCHW:
reshape (B, C, H/2, 2, W/2, 2), transpose to (B, C, 2, 2, H/2, W/2)). A permutation:
logdet = 0, and backward is the inverse permutation applied to dy.
"""
from ..backend import get_array_module
from .base import Layer, check_gradient, check_images


def squeeze(x):
    """(B, C, H, W) -> (B, 4C, H/2, W/2) as in the module docstring."""
    B, C, H, W = x.shape
    y = x.reshape(B, C, H // 2, 2, W // 2, 2).transpose(0, 1, 3, 5, 2, 4)
    return get_array_module(x).ascontiguousarray(y).reshape(B, 4 * C, H // 2, W // 2)


def unsqueeze(y):
    """(B, 4C, H, W) -> (B, C, 2H, 2W): the inverse of ``squeeze``."""
    B, C4, H, W = y.shape
    x = y.reshape(B, C4 // 4, 2, 2, H, W).transpose(0, 1, 4, 2, 5, 3)
    return get_array_module(y).ascontiguousarray(x).reshape(B, C4 // 4, 2 * H, 2 * W)


class Squeeze(Layer):
    """Space-to-depth 2×2 and its inverse; logdet 0."""

    def forward(self, x):
        check_images(x, "x")
        B, C, H, W = x.shape
        if H % 2 or W % 2:
            raise ValueError(f"Squeeze needs an even height and width, got {H}×{W}")
        self._shape = x.shape
        return squeeze(x), get_array_module(x).zeros(B, dtype=x.dtype)

    def inverse(self, y):
        check_images(y, "y")
        if y.shape[1] % 4:
            raise ValueError(f"Squeeze.inverse needs a channel count divisible by 4, got {y.shape[1]}")
        return unsqueeze(y)

    def backward(self, dy, dlogdet):
        shape = getattr(self, "_shape", None)
        if shape is not None:
            B, C, H, W = shape
            shape = (B, 4 * C, H // 2, W // 2)
        check_gradient(dy, shape)
        return unsqueeze(dy)
