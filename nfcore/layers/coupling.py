"""AffineCoupling: Glow's affine coupling, and BlockCoupling, the general form QuadCoupling shares.

Shapes: x, y (B, C, H, W). x_a = the first C // 2 channels, x_b = the other C - C // 2::

    h           = NN(x_a)                          (B, 2·C_b, H, W), NN = nfcore.nn.Network
    shift, raw  = h[:, :C_b], h[:, C_b:]           (first half of h's channels, second half)
    s           = sigmoid(raw + 2)
    y_a = x_a,  y_b = (x_b + shift) · s
    logdet      = sum_{c,i,j} log s                 (per sample; log s = -softplus(-(raw+2)))
    x_b         = y_b / s - shift                   (inverse: NN(y_a) = NN(x_a) gives shift, s)

The network's last conv is zero-initialized, so h = 0 at the start and the layer starts as the
fixed map y_a = x_a, y_b = sigmoid(2) · x_b ≈ 0.881 · x_b (as in Glow; not the identity).

**Bounded scale** (``scale_bound`` = c, off by default: Glow's form above). The inverse divides
by s, so an input the networks were not trained on (an image 4× the training size, noise) can
drive s towards 0 — log s of −40 on the digits model's 4×-size inputs, measured — and the
rounding errors of the layers above are multiplied by 1/s ≈ 1e17 on the way down: finite,
wrong reconstructions.
With a bound, log s is squashed smoothly into [−c, 0], so that 1/s ≤ e^c::

    q = softplus(−(raw + 2))          (= −log sigmoid(raw + 2) ≥ 0)
    log s = −c · tanh(q / c)          (≈ −q while q ≪ c: the same layer where s is not small)
    d log s / d raw = (1 − s₀) · (1 − tanh²(q / c)),   s₀ = sigmoid(raw + 2) = e^(−q)

Backward of one affine step (``affine_backward``), L the loss, dlogdet = dL/dlogdet (B,)::

    dx_b   = dy_b · s
    dshift = dy_b · s
    draw   = dy_b · (x_b + shift) · s (1 - s)  +  dlogdet · (1 - s)
             (d log s / d raw = 1 - s: the logdet's own gradient, easy to forget)
    dx_a   = dy_a + NN.backward([dshift, draw])

BlockCoupling generalizes this to n channel blocks z_1 .. z_n (block k: channels
bounds[k-1] .. bounds[k]-1, bounds[k] = floor(k · C / n), so the blocks are as equal as possible
and the earlier ones never larger)::

    y_1 = z_1,   y_{k+1} = (z_{k+1} + t_k) · s_k,   (t_k, s_k) from h_k = f_k([z_1, ..., z_k])

for k = 1 .. n-1, each f_k its own Network reading the *input* blocks z_1..z_k (a prefix of x's
channels). AffineCoupling is n = 2 with f_1 = "nn"; QuadCoupling (quad.py) is n = 4. The
Jacobian is block triangular with diagonal blocks diag(s_k), so logdet = sum_k sum log s_k; the
inverse solves the blocks in order, because f_k needs z_1..z_k, all solved already.
"""
import numpy as np

from ..backend import get_array_module
from ..nn.composite import Composite, spawn_seed
from ..nn.fused import (affine_backward_numba, affine_forward_numba, affine_inverse_numba,
                        scale_constants, use_fused)
from ..nn.network import Network
from .base import check_images, check_same_device

SCALE_SHIFT = 2.0    # s = sigmoid(raw + 2): starts at 0.88, close to 1, and bounded in (0, 1)


def _log_scale(raw, bound=None):
    """(log s, d log s / d raw) from raw, without overflow; log s = log sigmoid(raw + 2) =
    −softplus(−(raw + 2)), squashed into [−bound, 0] when a bound is given (module docstring).
    The slope is None without a bound: backward computes it as 1 − s."""
    xp = get_array_module(raw)
    q = xp.logaddexp(0, -(raw + SCALE_SHIFT))
    if bound is None:
        return -q, None
    squashed = xp.tanh(q / bound)
    return -bound * squashed, -xp.expm1(-q) * (1 - squashed * squashed)


def _shift_raw(h):
    n = h.shape[1] // 2
    return h[:, :n], h[:, n:]


def affine_forward(x, h, bound=None):
    """y = (x + shift) · s and logdet (B,) = Σ log s, from h = [shift, raw]; and a cache."""
    shift, raw = _shift_raw(h)
    log_s, slope = _log_scale(raw, bound)
    s = get_array_module(x).exp(log_s)
    shifted = x + shift
    return shifted * s, log_s.sum(axis=(1, 2, 3)), (shifted, s, slope)


def affine_inverse(y, h, bound=None):
    """x = y / s - shift."""
    shift, raw = _shift_raw(h)
    log_s, _ = _log_scale(raw, bound)
    return y * get_array_module(y).exp(-log_s) - shift


def affine_backward(dy, dlogdet, cache):
    """(dx, dh) of one affine step: see the module docstring (d log s / d raw = 1 − s without
    a bound, the cached slope with one)."""
    shifted, s, slope = cache
    xp = get_array_module(dy)
    dlogdet = dlogdet.astype(s.dtype, copy=False)[:, None, None, None]
    dx = dy * s
    draw = (dx * shifted + dlogdet) * ((1 - s) if slope is None else slope)
    return dx, xp.concatenate([dx, draw], axis=1)


class BlockCoupling(Composite):
    """n-block autoregressive affine coupling (see the module docstring); networks built lazily.

    ``net_names``: the names of the n-1 networks f_1 .. f_{n-1} (their params' prefixes).
    ``scale_bound``: None (Glow's s = sigmoid(raw + 2)) or c > 0, log s squashed into [−c, 0].
    """

    def __init__(self, net_names, channels=None, hidden=512, actnorm=False, dtype=None, seed=0,
                 scale_bound=None):
        super().__init__()
        if scale_bound is not None and not scale_bound > 0:
            raise ValueError(f"scale_bound must be None or > 0, got {scale_bound!r}")
        self.scale_bound = None if scale_bound is None else float(scale_bound)
        self.net_names = tuple(net_names)
        self.n_blocks = len(self.net_names) + 1
        self.hidden = hidden
        self.actnorm = actnorm
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.seed = seed
        self.channels = None
        if channels is not None:
            self._build(channels, eager=True)

    def _build(self, channels, eager):
        """Make the networks; ``eager``: create their weights now (on the default backend),
        else on their first input (with its array module and dtype)."""
        n = self.n_blocks
        if channels < n:
            raise ValueError(f"{type(self).__name__} splits the channels into {n} blocks and "
                             f"needs at least {n} channels, got {channels}")
        self.channels = int(channels)
        self.bounds = [k * channels // n for k in range(n + 1)]
        for k, name in enumerate(self.net_names):   # f_{k+1}: blocks 1..k+1 -> block k+2
            size_in, size_out = self.bounds[k + 1], self.bounds[k + 2] - self.bounds[k + 1]
            self.parts[name] = Network(2 * size_out, self.hidden, size_in if eager else None,
                                       self.actnorm, self.dtype, seed=spawn_seed(self.seed, k))

    def _prepare(self, x, name):
        check_same_device(x, self.params, name)
        check_images(x, name, self.channels)
        if self.channels is None:
            self._build(x.shape[1], eager=False)

    def _blocks(self):
        """(network, lo, hi) for each step: network f reads x[:, :lo], transforms x[:, lo:hi]."""
        return [(self.parts[name], self.bounds[k + 1], self.bounds[k + 2])
                for k, name in enumerate(self.net_names)]

    def forward(self, x):
        """y, logdet (B,)."""
        self._prepare(x, "x")
        if use_fused(x):
            return self._forward_fused(x)
        xp = get_array_module(x)
        y = x.copy()
        logdet = xp.zeros(x.shape[0], dtype=x.dtype)
        self._cache = []
        for net, lo, hi in self._blocks():
            h = net.forward(x[:, :lo])
            y[:, lo:hi], block_logdet, cache = affine_forward(x[:, lo:hi], h, self.scale_bound)
            logdet += block_logdet
            self._cache.append(cache)
        return y, logdet

    def inverse(self, y):
        """x block by block: x_1 = y_1, then x_{k+1} = y_{k+1} / s_k - t_k with f_k(x_1..x_k).

        Running the networks replaces what their forward cached: backward needs a new forward.
        """
        self._prepare(y, "y")
        self._cache = None
        if use_fused(y):
            return self._inverse_fused(y)
        x = y.copy()
        for net, lo, hi in self._blocks():
            x[:, lo:hi] = affine_inverse(y[:, lo:hi], net.forward(x[:, :lo]), self.scale_bound)
        return x

    def backward(self, dy, dlogdet):
        """dx from dy (B, C, H, W) and dlogdet (B,); adds into the networks' grads."""
        if getattr(self, "_cache", None) is None:
            raise RuntimeError("backward called before forward")
        check_images(dy, "dy", self.channels, finite=False)
        shifted = self._cache[0][0]
        if dy.shape[0] != shifted.shape[0] or dy.shape[2:] != shifted.shape[2:]:
            raise ValueError(f"dy has shape {tuple(dy.shape)}, forward's output had batch "
                             f"{shifted.shape[0]} and size {tuple(shifted.shape[2:])}")
        dy = dy.astype(shifted.dtype, copy=False)
        if use_fused(dy):
            return self._backward_fused(dy, dlogdet)
        dx = dy.copy()                       # block 1: y_1 = z_1
        for (net, lo, hi), cache in zip(self._blocks(), self._cache):
            # block lo:hi is set here, before any later network adds into it (those read x[:, :lo']
            # with lo' >= hi and come later in this loop); this network adds into earlier blocks.
            dx[:, lo:hi], dh = affine_backward(dy[:, lo:hi], dlogdet, cache)
            dx[:, :lo] += net.backward(dh)
        return dx


    # The fused forms (NumPy arrays, nfcore.nn.fused.FUSED): one Numba pass per block for the
    # log-scale, scale, output and log-det (and for backward's and the inverse's formulas),
    # reading the network's output h channel-last as Network.forward_last makes it and writing
    # dh channel-last for Network.backward_last: no layout conversion of h or dh. The caches
    # are the reference's (shifted, s, slope), so either backward can follow either forward.

    def _forward_fused(self, x):
        x = np.ascontiguousarray(x)
        B, C, H, W = x.shape
        y = x.copy()
        x3, y3 = x.reshape(B, C, H * W), y.reshape(B, C, H * W)
        c = scale_constants(x.dtype, self.scale_bound)
        logdet = np.zeros(B)
        self._cache = []
        for net, lo, hi in self._blocks():
            h = net.forward_last(x[:, :lo])                     # (B, H, W, 2·Cb)
            shifted = np.empty((B, hi - lo, H, W), dtype=x.dtype)
            s = np.empty_like(shifted)
            slope = None if self.scale_bound is None else np.empty_like(shifted)
            flat = (B, hi - lo, H * W)
            logdet += affine_forward_numba(x3, lo, h.reshape(B, H * W, -1), c, y3,
                                           shifted.reshape(flat), s.reshape(flat),
                                           (s if slope is None else slope).reshape(flat))
            self._cache.append((shifted, s, slope))
        return y, logdet.astype(x.dtype)

    def _inverse_fused(self, y):
        y = np.ascontiguousarray(y)
        B, C, H, W = y.shape
        x = y.copy()
        x3, y3 = x.reshape(B, C, H * W), y.reshape(B, C, H * W)
        c = scale_constants(y.dtype, self.scale_bound)
        for net, lo, hi in self._blocks():
            h = net.forward_last(x[:, :lo])
            affine_inverse_numba(y3, lo, h.reshape(B, H * W, -1), c, x3)
        return x

    def _backward_fused(self, dy, dlogdet):
        dy = np.ascontiguousarray(dy)
        B, C, H, W = dy.shape
        dx = dy.copy()                       # block 1: y_1 = z_1
        dy3, dx3 = dy.reshape(B, C, H * W), dx.reshape(B, C, H * W)
        c = scale_constants(dy.dtype, self.scale_bound)
        dlogdet = np.ascontiguousarray(dlogdet, dtype=dy.dtype)
        for (net, lo, hi), (shifted, s, slope) in zip(self._blocks(), self._cache):
            flat = (B, hi - lo, H * W)
            s3 = np.ascontiguousarray(s).reshape(flat)
            dh = affine_backward_numba(dy3, lo, dlogdet, np.ascontiguousarray(shifted).reshape(flat),
                                       s3, s3 if slope is None else np.ascontiguousarray(slope).reshape(flat),
                                       slope is not None, c, dx3)
            dx[:, :lo] += net.backward_last(dh.reshape(B, H, W, -1))
        return dx


class AffineCoupling(BlockCoupling):
    """Glow's affine coupling: y_b = (x_b + shift) · sigmoid(raw + 2), [shift, raw] = NN(x_a).

    params: the network's, under "nn." ("nn.conv1.weight", ..., "nn.conv3.logs").
    ``hidden``: the network's width; ``actnorm``: ActNorm after its hidden convs (Glow's choice);
    ``scale_bound``: see the module docstring (None: Glow's form).
    """

    def __init__(self, channels=None, hidden=512, actnorm=False, dtype=None, seed=0, scale_bound=None):
        super().__init__(("nn",), channels, hidden, actnorm, dtype, seed, scale_bound)
