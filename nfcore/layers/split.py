"""Split: factor out half of the channels under a learned conditional Gaussian prior (Glow).

Shapes: x (B, C, H, W), C >= 2; z1 = x[:, :C1] kept, z2 = x[:, C1:] factored out, C1 = C // 2,
C2 = C - C1::

    h           = Conv2dZero(z1)                   (B, 2·C2, H, W), zero-initialized 3×3 conv
                                                   (run channel-last: z1 and h transposed at its edges)
    mean, logs  = h[:, :C2], h[:, C2:]
    logp        = log N(z2; mean, exp(logs)²)      (B,), summed over z2's values

forward(x) returns (z1, logp): **the prior's log-likelihood of z2 takes the place of the
logdet** (the usual trick: a flow sums every layer's second output and adds the top prior, so
log p(x) = Σ logdets + Σ split logps + log N(z_top; 0, I) needs no special case, and backward
gets dL/dlogp through its ``dlogdet`` argument). The Jacobian of x -> z1 is not square, so
this second output is not a log-determinant: it is a log-density. z2 of the last forward is
kept in ``self.z2`` (e.g. to encode and reconstruct).

At the start (Conv2dZero's zeros) mean = 0, logs = 0: the prior of z2 is the standard normal.

inverse(z1, z2=None, temperature=1.0, rng=None): x = [z1, z2]; without z2, z2 is sampled as
mean + temperature · exp(logs) · ε from the prior given z1 (ε from the NumPy Generator ``rng``).

backward(dz1, dlogdet, dz2=None), with dlogdet (B,) = dL/dlogp and w = (z2 - mean)·exp(-2 logs)::

    dz2   = -w · dlogdet  (+ dz2 when the loss uses z2 directly)
    dmean =  w · dlogdet,   dlogs = (w · (z2 - mean) - 1) · dlogdet
    dz1  += Conv2dZero.backward([dmean, dlogs])

params: "prior.weight" (2·C2, C1, 3, 3), "prior.bias" (2·C2,), "prior.logs" (2·C2,).
"""
import numpy as np

from ..backend import get_array_module
from ..nn.composite import Composite
from ..nn.conv2d_zero import Conv2dZero
from ..nn.network import channel_first, channel_last
from .base import check_images, check_same_device
from .prior import gaussian_log_prob, gaussian_log_prob_grads, gaussian_sample


class Split(Composite):
    """Keep z1 = x[:, :C//2], factor out z2 = x[:, C//2:] with logp = log N(z2; prior(z1))."""

    def __init__(self, channels=None, dtype=None):
        super().__init__()
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.channels = None
        self.z2 = None
        if channels is not None:
            self._build(channels, eager=True)

    def _build(self, channels, eager):
        if channels < 2:
            raise ValueError(f"Split needs at least 2 channels, got {channels}")
        self.channels = int(channels)
        self.kept = channels // 2
        C1, C2 = self.kept, channels - self.kept
        self.parts["prior"] = Conv2dZero(2 * C2, 3, C1 if eager else None, dtype=self.dtype)

    def prior_mean_logs(self, z1):
        """(mean, logs) of z2's Gaussian given z1, each (B, C2, H, W)."""
        h = channel_first(self.prior.forward(channel_last(z1)))
        C2 = h.shape[1] // 2
        return h[:, :C2], h[:, C2:]

    def forward(self, x):
        """(z1, logp): z1 (B, C1, H, W) and log p(z2 | z1) (B,) in the logdet's place."""
        check_same_device(x, self.params, "x")
        check_images(x, "x", self.channels)
        if self.channels is None:
            self._build(x.shape[1], eager=False)
        xp = get_array_module(x)
        z1 = xp.ascontiguousarray(x[:, :self.kept])
        z2 = xp.ascontiguousarray(x[:, self.kept:])
        mean, logs = self.prior_mean_logs(z1)
        self.z2 = z2
        self._cache = (z2, mean, logs)
        return z1, gaussian_log_prob(z2, mean, logs)

    def inverse(self, z1, z2=None, temperature=1.0, rng=None):
        """x = [z1, z2]; z2 sampled from the prior given z1 when not given."""
        check_same_device(z1, self.params, "z1")
        check_images(z1, "z1")
        if self.channels is not None and z1.shape[1] != self.kept:
            raise ValueError(f"z1 has {z1.shape[1]} channels, Split keeps {self.kept}")
        if self.channels is None:
            raise RuntimeError("Split.inverse needs the channel count: run forward once or "
                               "pass channels to the constructor")
        xp = get_array_module(z1)
        if z2 is None:
            z2 = self.draw(z1, temperature, rng)
        else:
            check_images(z2, "z2")
            expected = (z1.shape[0], self.channels - self.kept) + tuple(z1.shape[2:])
            if tuple(z2.shape) != expected:
                raise ValueError(f"z2 has shape {tuple(z2.shape)}, expected {expected}")
        return xp.concatenate([z1, z2.astype(z1.dtype, copy=False)], axis=1)

    def draw(self, z1, temperature=1.0, rng=None, rows=None):
        """z2 ~ N(mean, (T·exp(logs))²) given z1, for the first ``rows`` images of z1 (all when
        None; the prior still runs on all of them): what ``inverse`` draws without z2."""
        self._cache = None               # the prior conv's cache is replaced: no stale backward
        mean, logs = self.prior_mean_logs(z1)
        return gaussian_sample(mean[:rows], logs[:rows], temperature, rng)

    def backward(self, dz1, dlogdet, dz2=None):
        """dx (B, C, H, W) from dz1, dlogdet = dL/dlogp (B,) and an optional dz2."""
        if getattr(self, "_cache", None) is None:
            raise RuntimeError("backward called before forward")
        z2, mean, logs = self._cache
        expected = (z2.shape[0], self.kept) + tuple(z2.shape[2:])
        if tuple(dz1.shape) != expected:
            raise ValueError(f"dz1 has shape {tuple(dz1.shape)}, forward's z1 had {expected}")
        xp = get_array_module(z2)
        g = dlogdet.astype(z2.dtype, copy=False)[:, None, None, None]
        dz2_logp, dmean, dlogs = gaussian_log_prob_grads(z2, mean, logs)
        dx2 = dz2_logp * g
        if dz2 is not None:
            dx2 = dx2 + dz2
        dh = xp.concatenate([dmean * g, dlogs * g], axis=1)
        dx1 = dz1.astype(z2.dtype, copy=False) + channel_first(self.prior.backward(channel_last(dh)))
        return xp.concatenate([dx1, dx2], axis=1)
