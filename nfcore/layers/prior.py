"""Gaussian log-densities: the standard normal top prior of a flow, and the diagonal Gaussian
that Split's learned prior uses (one implementation serves both).

Shapes: z, mean, logs (B, C, H, W) (mean and logs may be scalars); log-densities (B,)::

    log N(z; mean, exp(logs)²) = sum_{c,i,j} -1/2 · (log 2π + 2 · logs + (z - mean)² · exp(-2 · logs))

Gradients of that per-sample sum, with w = (z - mean) · exp(-2 · logs)::

    d/dz = -w,   d/dmean = w,   d/dlogs = w · (z - mean) - 1
"""
import math

import numpy as np

from ..backend import get_array_module
from .base import check_images

LOG_2PI = math.log(2 * math.pi)


def gaussian_log_prob(z, mean=0.0, logs=0.0):
    """(B,) log N(z; mean, diag(exp(logs))²), summed over each sample's values."""
    xp = get_array_module(z)
    elementwise = -0.5 * (LOG_2PI + 2 * logs + (z - mean) ** 2 * xp.exp(-2 * logs))
    return elementwise.reshape(z.shape[0], -1).sum(axis=1)


def gaussian_log_prob_grads(z, mean=0.0, logs=0.0):
    """(dz, dmean, dlogs): the gradients of ``gaussian_log_prob`` for each sample's sum."""
    w = (z - mean) * get_array_module(z).exp(-2 * logs)
    return -w, w, w * (z - mean) - 1


def gaussian_sample(mean, logs, temperature=1.0, rng=None):
    """mean + temperature · exp(logs) · ε, ε ~ N(0, I) drawn by NumPy's ``rng`` (seeded or not),
    moved to mean's array module (so samples are the same on CPU and GPU for the same rng)."""
    xp = get_array_module(mean)
    rng = np.random.default_rng() if rng is None else rng
    eps = xp.asarray(rng.standard_normal(mean.shape), dtype=mean.dtype)
    return mean + temperature * xp.exp(logs) * eps


class GaussianPrior:
    """The standard normal top prior: log p(z) = log N(z; 0, I) per sample.

    forward(z) -> logp (B,); backward(dlogp) -> dz = -z · dlogp (dlogp (B,) = dL/dlogp);
    sample(shape, ...) draws z ~ N(0, temperature² I). No parameters.
    """

    params = {}
    grads = {}

    def forward(self, z):
        check_images(z, "z")
        self._z = z
        return gaussian_log_prob(z)

    def backward(self, dlogp):
        z = getattr(self, "_z", None)
        if z is None:
            raise RuntimeError("backward called before forward")
        dz, _, _ = gaussian_log_prob_grads(z)
        return dz * dlogp.astype(z.dtype, copy=False)[:, None, None, None]

    def sample(self, shape, temperature=1.0, rng=None, dtype=np.float32, xp=np):
        """z (shape) ~ N(0, temperature² I); ``xp``: numpy or cupy, where z should live."""
        zeros = xp.zeros(shape, dtype=dtype)
        return gaussian_sample(zeros, zeros, temperature, rng)
