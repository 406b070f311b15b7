"""EmergingConv: the emerging convolution of Hoogeboom et al. 2019, the baseline of FInC/CInC,
as its official code defines it (``invertible_conv2D_emerging``).

Shapes: x, y (B, C, H, W). The published emerging convolution of size k (k odd) is two masked
autoregressive convolutions of size m = (k+1)/2 with opposite padding corners and opposite
self-tap triangles, each with a learned diagonal, then a per-channel bias::

    u = conv1(x)       bottom-right corner, m×m, lower self-tap (co reads ci <= co):
                       u[i, j] reads x at i..i+m-1, j..j+m-1
    y = conv2(u) + b   top-left corner, m×m, upper self-tap (co reads ci >= co): a CInCConv
                       (cinc.py), y[i, j] reads u at i-m+1..i, j-m+1..j
    logdet = H·W·Σ log_diag1 + H·W·Σ log_diag2

conv2's mask is conv1's flipped on all four axes (rows, columns and both channel axes), as in
the official code, so on a 1×1 image the composition's channel Jacobian U·L is full, not
triangular. Together y[i, j] reads x on the k×k window centred on (i, j) (2m − 1 = k): k = 3 is
two 2×2 convolutions, the receptive field of a 3×3 FInC unit or CInC conv, so that the papers'
comparisons are at equal receptive field. Initialisation as published: every weight
N(0, 0.02²), each self-tap's diagonal 1 + N(0, 0.02²). As in CInCConv, each diagonal is exp(s)
(positive) where the published one is a free-sign d (same functions along training, cinc.py).

The inverse is the published one: each conv is undone by a sequential raster-scan substitution,
pixel after pixel (H·W steps), parallel only over the batch (``InvConv.inverse(y,
method="raster")``), first conv2 (the bias removed), then conv1. This is deliberately not the
wavefront solve that InvConv.inverse uses: Emerging is the baseline it is measured against.

params: "conv1.weight" (C, C, m, m), "conv1.log_diag" (C,), "conv2.weight", "conv2.log_diag",
"conv2.bias" (C,).
"""
import numpy as np

from ..nn.composite import Composite, spawn_seed
from .base import check_images, check_same_device
from .cinc import PUBLISHED_INIT_STD, CInCConv
from .invconv import InvConv


class EmergingConv(Composite):
    """conv2(conv1(x)) + b: masked (k+1)/2 × (k+1)/2 convs, bottom-right with a lower self-tap
    then top-left with an upper one (and the bias), learned diagonals; a k×k receptive field
    (k odd)."""

    def __init__(self, k=3, channels=None, dtype=None, seed=0):
        super().__init__()
        if not isinstance(k, (int, np.integer)) or k < 1 or k % 2 == 0:
            raise ValueError(f"EmergingConv needs an odd kernel size k >= 1 (two (k+1)/2 × "
                             f"(k+1)/2 convolutions), got {k!r}")
        self.k = k
        m = (k + 1) // 2
        self.parts["conv1"] = InvConv(m, channels, "bottom-right", learn_diag=True, dtype=dtype,
                                      seed=spawn_seed(seed, 1), init_std=PUBLISHED_INIT_STD)
        self.parts["conv2"] = CInCConv(m, channels, dtype=dtype, seed=spawn_seed(seed, 2))

    @property
    def channels(self):
        return self.conv1.channels

    def forward(self, x):
        u, logdet1 = self.conv1.forward(x)
        y, logdet2 = self.conv2.forward(u)
        return y, logdet1 + logdet2

    def inverse(self, y):
        check_same_device(y, self.params, "y")
        check_images(y, "y", self.channels)
        return self.conv1.inverse(self.conv2.inverse(y, method="raster"), method="raster")

    def backward(self, dy, dlogdet):
        return self.conv1.backward(self.conv2.backward(dy, dlogdet), dlogdet)
