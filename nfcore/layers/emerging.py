"""EmergingConv: the emerging convolution of Hoogeboom et al. 2019, the baseline of FInC/CInC.

Shapes: x, y (B, C, H, W). Two masked k×k convolutions (InvConv, invconv.py) with opposite
padding corners, each with a learned diagonal on its self-tap, applied one after the other::

    u = conv1(x)       top-left corner:     u[i, j] depends on x at (i', j') with i' <= i, j' <= j
    y = conv2(u)       bottom-right corner: y[i, j] depends on u at (i', j') with i' >= i, j' >= j
    logdet = H·W·Σ log_diag1 + H·W·Σ log_diag2

Together the receptive field covers the whole k×k neighbourhood (2k-1 wide) in every direction.

The inverse is the published one: each conv is undone by a sequential raster-scan substitution,
pixel after pixel (H·W steps), parallel only over the batch (``InvConv.inverse(y,
method="raster")``), first conv2, then conv1. This is deliberately not the wavefront solve that
InvConv.inverse uses: Emerging is the baseline it is measured against.

params: "conv1.weight" (C, C, k, k), "conv1.log_diag" (C,), "conv2.weight", "conv2.log_diag".
"""
from ..nn.composite import Composite, spawn_seed
from .base import check_images, check_same_device
from .invconv import InvConv


class EmergingConv(Composite):
    """conv2(conv1(x)): masked k×k convs, top-left then bottom-right, learned diagonals."""

    def __init__(self, k=3, channels=None, dtype=None, seed=0):
        super().__init__()
        self.parts["conv1"] = InvConv(k, channels, "top-left", learn_diag=True, dtype=dtype,
                                      seed=spawn_seed(seed, 1))
        self.parts["conv2"] = InvConv(k, channels, "bottom-right", learn_diag=True, dtype=dtype,
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
