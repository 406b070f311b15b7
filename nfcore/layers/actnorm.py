"""ActNorm: Glow's per-channel affine layer with data-dependent initialization.

Shapes: x, y (B, C, H, W); bias (C,), logs (C,)::

    y[n, c, i, j] = (x[n, c, i, j] + bias[c]) * exp(logs[c])
    logdet        = H · W · sum_c logs[c]                       (the same for every sample)
    x             = y * exp(-logs) - bias                        (inverse)

Initialization: the first ``forward`` sets bias = -mean and logs = -log(std + 1e-6), mean and std
per channel over the batch and the pixels (``channel_moments``: two passes in float64), so that
this first batch comes out with zero mean and unit variance per channel. From then on bias and logs are ordinary parameters. The
``initialized`` flag is part of ``state()`` so that a model loaded from a checkpoint is not
initialized a second time on its first batch (a bug many Glow ports have).

Data-parallel training sees only a slice of the batch in each process; inside
``with moments_from(function):`` every ActNorm that initializes takes (mean, std) from
``function(x)`` instead, which returns the whole batch's statistics (train/distributed.py
reduces them over the processes).

``inverse`` before initialization raises RuntimeError: the statistics are those of the data x,
and an output y (e.g. a sample from the prior) says nothing about them. Run a forward pass on
data first, or load a checkpoint (its parameters and ``load_state``).

Backward::

    dx     = dy * exp(logs)
    dbias  = sum_{n,i,j} dy * exp(logs)
    dlogs  = sum_{n,i,j} dy * y  +  H · W · sum_n dlogdet[n]
"""

import contextlib

from ..backend import get_array_module
from .base import Layer, check_finite, check_gradient, check_images, check_same_device

EPS = 1e-6
_moments = None      # set by moments_from: x -> (mean (C,), std (C,)) of the whole batch


def channel_moments(x):
    """(mean, std) per channel of x (B, C, H, W), each (C,) in x's dtype, computed in float64
    in two passes: mean = Σx / n, then var = Σ(x − mean)² / n, with n = B·H·W."""
    xp = get_array_module(x)
    x64 = x.astype(xp.float64)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = x64.sum(axis=(0, 2, 3)) / count
    variance = ((x64 - mean[None, :, None, None]) ** 2).sum(axis=(0, 2, 3)) / count
    return mean.astype(x.dtype), xp.sqrt(variance).astype(x.dtype)


@contextlib.contextmanager
def moments_from(function):
    """Within the block, ActNorm initializes from ``function(x)`` -> (mean, std), each (C,)
    in x's array module, instead of x's own per-channel mean and std."""
    global _moments
    outer, _moments = _moments, function
    try:
        yield
    finally:
        _moments = outer


class ActNorm(Layer):
    """Per-channel scale and bias, initialized from the first batch. params: "bias", "logs"."""

    def __init__(self, channels=None, dtype=None):
        super().__init__()
        self.initialized = False
        self._lazy_parameters(channels, dtype)

    def _build(self, channels, xp, dtype):
        self.channels = int(channels)
        self.params = {"bias": xp.zeros(channels, dtype=dtype), "logs": xp.zeros(channels, dtype=dtype)}
        self.zero_grad()

    def state(self):
        return {"initialized": self.initialized}

    def load_state(self, state):
        if "initialized" not in state:
            raise KeyError("ActNorm state needs 'initialized' (True once its data-dependent "
                           "initialization has run)")
        self.initialized = bool(state["initialized"])

    def initialize(self, x):
        """Set bias and logs so that x comes out with zero mean and unit variance per channel."""
        xp = get_array_module(x)
        mean, std = (_moments or channel_moments)(x)
        self.params["bias"][...] = -mean
        self.params["logs"][...] = -xp.log(std + EPS)
        self.initialized = True

    def _bias_logs(self, dtype):
        """bias and logs as (1, C, 1, 1) arrays of the given dtype."""
        return tuple(self.params[name].astype(dtype, copy=False)[None, :, None, None]
                     for name in ("bias", "logs"))

    def _logdet(self, shape, xp, dtype):
        B, _, H, W = shape
        return xp.full(B, H * W * self.params["logs"].astype(dtype).sum(), dtype=dtype)

    def forward(self, x):
        """y, logdet; the first call initializes bias and logs from x."""
        self._prepare(x, "x")
        xp = get_array_module(x)
        if not self.initialized:
            check_finite({"x": x})    # even inside Flow's deferred checks: NaN would stay
            self.initialize(x)
        bias, logs = self._bias_logs(x.dtype)
        self._cache = x
        return (x + bias) * xp.exp(logs), self._logdet(x.shape, xp, x.dtype)

    def inverse(self, y):
        """x = y * exp(-logs) - bias. Refused before initialization (see the module docstring)."""
        check_same_device(y, self.params, "y")
        check_images(y, "y", self.channels)
        if not self.initialized:
            raise RuntimeError("ActNorm.inverse called before initialization: run forward on a "
                               "batch of data first, or load the parameters and state of a "
                               "trained model (load_state({'initialized': True}))")
        bias, logs = self._bias_logs(y.dtype)
        return y * get_array_module(y).exp(-logs) - bias

    def backward(self, dy, dlogdet):
        """dx from dy (B, C, H, W) and dlogdet (B,); adds dL/dbias and dL/dlogs."""
        x = getattr(self, "_cache", None)
        check_gradient(dy, None if x is None else x.shape)
        xp = get_array_module(x)
        dy = dy.astype(x.dtype, copy=False)
        bias, logs = self._bias_logs(x.dtype)
        scale = xp.exp(logs)
        dx = dy * scale
        H, W = x.shape[2], x.shape[3]
        self.grads["bias"] += dx.sum(axis=(0, 2, 3)).astype(self.grads["bias"].dtype)
        dlogs = (dx * (x + bias)).sum(axis=(0, 2, 3)) + H * W * dlogdet.sum()
        self.grads["logs"] += dlogs.astype(self.grads["logs"].dtype)
        return dx
