"""Network: the coupling network NN(x) of Glow's affine coupling.

Shapes: x (B, C_in, H, W) -> h (B, C_out, H, W), channels first like every flow layer::

    h = Conv2dZero_3x3( ReLU( Conv_1x1( ReLU( Conv_3x3(x) ) ) ) )
            C_in -> hidden -> hidden -> C_out

Inside, the activations are channel-last (B, H, W, channels), the layout in which each conv is
one matrix product with no transposes (see conv2d.py): forward transposes x once on entry and
h once on exit, backward does the same for dh and dx. With ``actnorm=True`` each hidden conv
drops its bias and is followed by an ActNorm, as in Glow (conv -> ActNorm -> ReLU). ActNorm is
a flow layer and reads (B, C, H, W): it gets the channel-first *view* of the channel-last array
(a transpose, no copy); its elementwise output keeps the memory layout of its input (NumPy's
default order "K"), so the view back to channel-last is contiguous again. Its log-determinant
plays no part here (the network is not a flow step), so its backward gets dlogdet = 0. The last
conv is zero-initialized: h = 0 at the start, whatever x.

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


def channel_last(x):
    """(B, C, H, W) -> (B, H, W, C), contiguous (one copy)."""
    return get_array_module(x).ascontiguousarray(x.transpose(0, 2, 3, 1))


def channel_first(x):
    """(B, H, W, C) -> (B, C, H, W), contiguous (one copy)."""
    return get_array_module(x).ascontiguousarray(x.transpose(0, 3, 1, 2))


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

    def release(self):
        """Drop every cache: the convs' and ActNorms' inputs (the parts) and the ReLUs' outputs."""
        super().release()
        self.relu1.release()
        self.relu2.release()

    def forward(self, x):
        """h (B, C_out, H, W) = NN(x), x (B, C_in, H, W)."""
        return channel_first(self.forward_last(x))

    def backward(self, dh):
        """dx (B, C_in, H, W) from dh (B, C_out, H, W), in the reverse order of forward."""
        return self.backward_last(channel_last(dh))

    def forward_last(self, x):
        """h (B, H, W, C_out) channel-last = NN(x), x (B, C_in, H, W): forward without the
        conversion on exit (the affine coupling's fused pass reads h channel-last). Each hidden
        conv's bias is added inside its ReLU's pass (ReLU.forward_bias), in place."""
        h = self.conv1.forward_linear(channel_last(x))
        if self.actnorm:
            h = _actnorm_forward(self.norm1, h)
        h = self.relu1.forward_bias(h, self._bias("conv1", h.dtype))
        h = self.conv2.forward_linear(h)
        if self.actnorm:
            h = _actnorm_forward(self.norm2, h)
        h = self.relu2.forward_bias(h, self._bias("conv2", h.dtype))
        return self.conv3.forward(h)

    def backward_last(self, dh):
        """dx (B, C_in, H, W) from a channel-last dh (B, H, W, C_out). The ReLUs' masks and the
        hidden convs' bias gradients are one pass each (ReLU.backward_bias)."""
        dh = self.conv3.backward(dh)
        dh, dbias = self.relu2.backward_bias(dh)
        if self.actnorm:
            dh = _actnorm_backward(self.norm2, dh)
        else:
            self.conv2.grads["bias"] += dbias
        dh = self.conv2.backward_linear(dh)
        dh, dbias = self.relu1.backward_bias(dh)
        if self.actnorm:
            dh = _actnorm_backward(self.norm1, dh)
        else:
            self.conv1.grads["bias"] += dbias
        return channel_first(self.conv1.backward_linear(dh))

    def _bias(self, conv, dtype):
        """The hidden conv's bias in the activations' dtype, None with actnorm (no bias)."""
        return None if self.actnorm else self.parts[conv].params["bias"].astype(dtype, copy=False)


def _actnorm_forward(norm, h):
    """ActNorm on channel-last h (B, H, W, C), through its channel-first view."""
    y, _ = norm.forward(h.transpose(0, 3, 1, 2))
    return y.transpose(0, 2, 3, 1)


def _actnorm_backward(norm, dh):
    """ActNorm's backward on channel-last dh, with dlogdet = 0: its logdet is not in the loss."""
    dlogdet = get_array_module(dh).zeros(dh.shape[0], dtype=dh.dtype)
    return norm.backward(dh.transpose(0, 3, 1, 2), dlogdet).transpose(0, 2, 3, 1)
