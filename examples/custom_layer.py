"""Write your own invertible layer and prove it with nfcore.reference.check_layer.

    python examples/custom_layer.py              # add --small for the tiny sizes the tests use

A layer follows one contract (nfcore/layers/base.py):

    y, logdet = layer.forward(x)        x, y: (B, C, H, W); logdet: (B,), log|det dy/dx|
    x = layer.inverse(y)
    dx = layer.backward(dy, dlogdet)    adds dL/dparam into layer.grads, returns dL/dx

check_layer runs on it what tests/test_layers.py runs on every nfcore layer: the round trip,
the logdet against slogdet of the dense Jacobian (float64), and backward against finite
differences, for x and for every parameter.
"""
import sys

import numpy as np

import nfcore
from nfcore import reference


class LeakyFlow(nfcore.Layer):
    """y = x where x >= 0, α_c·x where x < 0, with α_c = exp(log_alpha[c]) > 0 learned per
    channel: monotone, so invertible; its Jacobian is diagonal, logdet = Σ over the negative
    entries of log α_c."""

    def __init__(self, channels, dtype=np.float64):
        super().__init__()
        self.channels = channels
        self.params = {"log_alpha": np.full(channels, np.log(0.5), dtype=dtype)}
        self.zero_grad()                                     # grads: zeros like params

    def _log_alpha(self):
        return self.params["log_alpha"][None, :, None, None]  # (1, C, 1, 1)

    def forward(self, x):
        negative = x < 0
        self._cache = x                                      # what backward needs
        y = np.where(negative, np.exp(self._log_alpha()) * x, x)
        logdet = (negative * self._log_alpha()).sum(axis=(1, 2, 3))
        return y, logdet

    def inverse(self, y):
        return np.where(y < 0, y * np.exp(-self._log_alpha()), y)   # y < 0 exactly where x < 0

    def backward(self, dy, dlogdet):
        x = self._cache
        negative = x < 0
        alpha = np.exp(self._log_alpha())
        # L depends on log_alpha through y (dy/dlog_alpha = α·x where x < 0) and through logdet
        # (one per negative entry of each sample, weighted by that sample's dlogdet).
        self.grads["log_alpha"] += (np.where(negative, alpha * x * dy, 0.0).sum(axis=(0, 2, 3))
                                    + (negative.sum(axis=(2, 3)) * dlogdet[:, None]).sum(axis=0))
        return np.where(negative, alpha * dy, dy)


SMALL = "--small" in sys.argv
shape = (2, 3, 4, 4) if SMALL else (4, 8, 8, 8)
x = np.random.default_rng(0).standard_normal(shape)       # float64: dense Jacobians need it
errors = reference.check_layer(LeakyFlow(channels=shape[1]), x, perturb=0.1)
print("LeakyFlow: " + ", ".join(f"{name} {value:.1e}" for name, value in errors.items()))
assert errors["inverse"] < 1e-12 and errors["logdet"] < 1e-10 and errors["backward"] < 1e-6, errors

# The same check on one of nfcore's own layers:
coupling = nfcore.AffineCoupling(channels=4, hidden=8, dtype="float64")
errors = reference.check_layer(coupling, np.random.default_rng(1).standard_normal((2, 4, 4, 4)),
                               perturb=0.05)       # perturb: its zero-initialized last conv moves
print(f"AffineCoupling: inverse {errors['inverse']:.1e}, logdet {errors['logdet']:.1e}, "
      f"backward {errors['backward']:.1e}")
