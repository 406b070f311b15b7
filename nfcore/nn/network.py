"""Network: the coupling network NN(x) of Glow's affine coupling.

Shapes: x (B, C_in, H, W) -> h (B, C_out, H, W)::

    h = Conv2dZero_3x3( ReLU( Conv_1x1( ReLU( Conv_3x3(x) ) ) ) )
            C_in -> hidden -> hidden -> C_out

With ``actnorm=True`` each hidden conv drops its bias and is followed by an ActNorm, as in Glow
(conv -> ActNorm -> ReLU); ActNorm's log-determinant plays no part here (the network is not a
flow step), so its backward gets dlogdet = 0. The last conv is zero-initialized: h = 0 at the
start, whatever x.

params (flattened): "conv1.weight" (hidden, C_in, 3, 3), "conv1.bias" (hidden,),
"conv2.weight" (hidden, hidden, 1, 1), "conv2.bias" (hidden,), "conv3.weight"
(C_out, hidden, 3, 3), "conv3.bias" (C_out,), "conv3.logs" (C_out,); with ``actnorm`` the hidden
convs have no bias and "norm1.bias", "norm1.logs", "norm2.bias", "norm2.logs" are added.

Not invertible: forward(x) -> h, backward(dh) -> dx (adds into the parts' grads).
"""
from ..backend import get_array_module
from ..layers.actnorm import ActNorm
from .composite import Composite, spawn_seed
from .conv2d import Conv2d
from .conv2d_zero import Conv2dZero
from .relu import ReLU


class Network(Composite):
    """conv3×3(hidden) → ReLU → conv1×1(hidden) → ReLU → Conv2dZero 3×3(out_channels)."""

    def __init__(self, out_channels, hidden=512, in_channels=None, actnorm=False, dtype=None, seed=0):
        super().__init__()
        self.actnorm = actnorm
        self.parts["conv1"] = Conv2d(hidden, 3, in_channels, bias=not actnorm, dtype=dtype,
                                     seed=spawn_seed(seed, 1))
        if actnorm:
            self.parts["norm1"] = ActNorm(hidden, dtype=dtype) if in_channels else ActNorm(dtype=dtype)
        self.relu1 = ReLU()
        self.parts["conv2"] = Conv2d(hidden, 1, hidden if in_channels else None, bias=not actnorm,
                                     dtype=dtype, seed=spawn_seed(seed, 2))
        if actnorm:
            self.parts["norm2"] = ActNorm(hidden, dtype=dtype) if in_channels else ActNorm(dtype=dtype)
        self.relu2 = ReLU()
        self.parts["conv3"] = Conv2dZero(out_channels, 3, hidden if in_channels else None, dtype=dtype)

    def forward(self, x):
        """h = NN(x)."""
        h = self.conv1.forward(x)
        if self.actnorm:
            h, _ = self.norm1.forward(h)
        h = self.relu1.forward(h)
        h = self.conv2.forward(h)
        if self.actnorm:
            h, _ = self.norm2.forward(h)
        h = self.relu2.forward(h)
        return self.conv3.forward(h)

    def backward(self, dh):
        """dx from dh, in the reverse order of forward."""
        dh = self.conv3.backward(dh)
        dh = self.relu2.backward(dh)
        if self.actnorm:
            dh = self.norm2.backward(dh, _no_logdet_grad(dh))
        dh = self.conv2.backward(dh)
        dh = self.relu1.backward(dh)
        if self.actnorm:
            dh = self.norm1.backward(dh, _no_logdet_grad(dh))
        return self.conv1.backward(dh)


def _no_logdet_grad(h):
    """dlogdet = 0 for an ActNorm inside the network: its logdet is not part of the loss."""
    return get_array_module(h).zeros(h.shape[0], dtype=h.dtype)
