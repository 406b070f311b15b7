"""EmergingConv: the emerging convolution of Hoogeboom et al. 2019, the baseline of FInC/CInC.

Shapes: x, y (B, C, H, W). The published emerging convolution of size k (k odd) is two masked
autoregressive convolutions of size m = (k+1)/2 (InvConv, invconv.py) with opposite padding
corners, each with a learned diagonal on its self-tap, applied one after the other::

    u = conv1(x)       top-left corner, m×m:     u[i, j] reads x at i−m+1..i, j−m+1..j
    y = conv2(u)       bottom-right corner, m×m: y[i, j] reads u at i..i+m−1, j..j+m−1
    logdet = H·W·Σ log_diag1 + H·W·Σ log_diag2

Together y[i, j] reads x on the k×k window centred on (i, j) (2m − 1 = k): k = 3 is two 2×2
convolutions, the same receptive field as a 3×3 FInC unit or CInC conv, so that the papers'
comparisons are at equal receptive field. (The published layer also has a bias and a
free-sign diagonal; here the diagonal is exp(log_diag), positive, and there is no bias.)

The inverse is the published one: each conv is undone by a sequential raster-scan substitution,
pixel after pixel (H·W steps), parallel only over the batch (``InvConv.inverse(y,
method="raster")``), first conv2, then conv1. This is deliberately not the wavefront solve that
InvConv.inverse uses: Emerging is the baseline it is measured against.

params: "conv1.weight" (C, C, m, m), "conv1.log_diag" (C,), "conv2.weight", "conv2.log_diag".
"""
import numpy as np

from ..nn.composite import Composite, spawn_seed
from .base import check_images, check_same_device
from .invconv import InvConv


class EmergingConv(Composite):
    """conv2(conv1(x)): masked (k+1)/2 × (k+1)/2 convs, top-left then bottom-right, learned
    diagonals; a k×k receptive field (k odd)."""

    def __init__(self, k=3, channels=None, dtype=None, seed=0):
        super().__init__()
        if not isinstance(k, (int, np.integer)) or k < 1 or k % 2 == 0:
            raise ValueError(f"EmergingConv needs an odd kernel size k >= 1 (two (k+1)/2 × "
                             f"(k+1)/2 convolutions), got {k!r}")
        self.k = k
        m = (k + 1) // 2
        self.parts["conv1"] = InvConv(m, channels, "top-left", learn_diag=True, dtype=dtype,
                                      seed=spawn_seed(seed, 1))
        self.parts["conv2"] = InvConv(m, channels, "bottom-right", learn_diag=True, dtype=dtype,
                                      seed=spawn_seed(seed, 2))

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
