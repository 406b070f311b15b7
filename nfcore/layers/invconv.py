"""InvConv: the masked k×k invertible convolution of FInC / CInC Flow, and the FInC unit.

Shapes: x, y (B, C, H, W). Weight W (C, C, k, k), W[co, ci, a, b].

Top-left form: pad the input with k-1 zeros on the top and on the left and convolve::

    y[n, co, i, j] = sum_{ci, a, b} W[co, ci, a, b] * x[n, ci, i-(k-1)+a, j-(k-1)+b]

Output pixel (i, j) sees only input pixels (i', j') with i' <= i and j' <= j. The last tap
a = b = k-1 couples a pixel to itself; we mask its C×C block to be lower triangular with the
diagonal fixed to 1 (FInC) or to exp(s_c) with a learned s (CInC). Ordering pixels by i + j, the
Jacobian is then triangular with that diagonal on every pixel::

    logdet = H * W * sum_c s_c        (0 without a learned diagonal)

and the inverse is a wavefront solve: anti-diagonal after anti-diagonal (i + j = 0, 1, ...,
H+W-2), every pixel of one anti-diagonal in parallel.

The other corners (top-right, bottom-left, bottom-right padding) are the top-left form applied to
the input flipped along the matching axes, with the output flipped back; one kernel serves all.

The mask is applied inside forward, inverse and backward: whatever values ``params`` hold, the
layer is invertible, and masked entries get exactly zero gradient. Learnable entries:
(k²-1)·C² + C(C-1)/2, plus C with the learned diagonal.

The self-tap's triangle has two orientations (``self_tap``): "lower", output channel co reads
input channels ci <= co at its own pixel (FInC), or "upper", ci >= co (the published CInC conv
and Emerging's second conv, whose mask is the first's flipped on all four axes). An upper layer
is a lower one with its channels reversed: the kernels see it so (the layout conversion reverses
the channels as it reverses rows and columns), and solve every layer by forward substitution.

Two more options make the published CInC / Emerging convolutions (cinc.py, emerging.py):
``bias``, a learned per-channel bias added after the convolution (y = conv(x) + b), and
``init_std``, the published initialisation: every weight N(0, init_std²) and the self-tap's
diagonal 1 + N(0, init_std²) (as exp(s), s = log(1 + ...)); without it, nfcore's own scheme
(std INIT_STD / sqrt(k²C), diagonal exactly 1).

Internally the layer works on groups: G sets of channels, each with its own corner and weight,
all solved in the same anti-diagonal sweep. InvConv is one group; FInCUnit (finc.py) is four.
"""
import numpy as np

from .. import kernels
from ..backend import get_array_module
from .base import Layer, check_gradient, check_images

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
# (flip rows, flip columns) that turn each corner into the top-left form
_FLIPS = {"top-left": (False, False), "top-right": (False, True),
          "bottom-left": (True, False), "bottom-right": (True, True)}
INIT_STD = 0.1  # std of the initial weights is INIT_STD / sqrt(k·k·C): the layer starts near identity
SELF_TAPS = ("lower", "upper")


def self_tap_mask(C, k, self_tap="lower", xp=np):
    """(C, C, k, k) mask, [co, ci, a, b]: 1 everywhere except the self-tap's diagonal and its
    upper triangle (ci > co; "lower") or its lower triangle (ci < co; "upper")."""
    mask = xp.ones((C, C, k, k))
    below_diagonal = xp.tril(xp.ones((C, C)), -1)
    mask[:, :, k - 1, k - 1] = below_diagonal if self_tap == "lower" else below_diagonal.T
    return mask


class GroupedMaskedConv(Layer):
    """G masked convolutions side by side on G equal channel groups, one corner each.

    params: "weight" (G, Cg, Cg, k, k); with ``learn_diag`` also "log_diag" (G, Cg); with
    ``bias`` also "bias" (G, Cg). Weights are created on first use from the input's channel
    count when ``channels`` is None. ``self_tap``, ``bias``, ``init_std``: see the module
    docstring.
    """

    def __init__(self, k, corners, channels=None, learn_diag=False, dtype=None, seed=0,
                 self_tap="lower", bias=False, init_std=None):
        super().__init__()
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"kernel size k must be a positive integer, got {k!r}")
        for corner in corners:
            if corner not in CORNERS:
                raise ValueError(f"unknown corner {corner!r}: choose one of {CORNERS}")
        if self_tap not in SELF_TAPS:
            raise ValueError(f"unknown self_tap {self_tap!r}: choose one of {SELF_TAPS}")
        self.k = int(k)
        self.corners = tuple(corners)
        self.learn_diag = learn_diag
        self.self_tap = self_tap
        self.has_bias = bias
        self.init_std = init_std
        self.inverse_method = "wavefront"   # what inverse(y) uses when no method is given
        self._lazy_parameters(channels, dtype, seed)

    # ---- parameters ---------------------------------------------------------------------
    def _build(self, channels, xp, dtype):
        G, k = len(self.corners), self.k
        if channels < 1 or channels % G:
            raise ValueError(f"{type(self).__name__} needs a channel count divisible by {G}, "
                             f"got {channels}")
        Cg = channels // G
        rng = np.random.default_rng(self.seed)
        weight = rng.standard_normal((G, Cg, Cg, k, k))
        weight = (weight * INIT_STD / np.sqrt(k * k * Cg) if self.init_std is None
                  else weight * self.init_std)
        self.channels = channels
        self.params = {"weight": xp.asarray(weight, dtype=dtype)}
        if self.learn_diag:
            idx = np.arange(Cg)
            log_diag = (np.zeros((G, Cg)) if self.init_std is None       # published: diagonal
                        else np.log(np.abs(1 + weight[:, idx, idx, k - 1, k - 1])))  # 1 + N(0, std²)
            self.params["log_diag"] = xp.asarray(log_diag, dtype=dtype)
        if self.has_bias:
            self.params["bias"] = xp.zeros((G, Cg), dtype=dtype)
        self._mask = xp.asarray(self_tap_mask(Cg, k, self.self_tap), dtype=dtype)
        self.zero_grad()

    def _grouped(self, arrays):
        """The group-axis views of "weight" and "log_diag" (identity here; InvConv adds G=1)."""
        return arrays["weight"], arrays.get("log_diag")

    def _bias_image(self, dtype):
        """The bias as a (1, C, 1, 1) array of ``dtype`` to add to (B, C, H, W) images; None
        without a bias."""
        if not self.has_bias:
            return None
        return self.params["bias"].reshape(1, -1, 1, 1).astype(dtype, copy=False)

    def effective_weight(self, dtype=None):
        """W ⊙ mask with the self-tap diagonal set to 1 or exp(s): (G, Cg, Cg, k, k)."""
        weight, log_diag = self._grouped(self.params)
        xp = get_array_module(weight)
        w = weight * self._mask
        G, Cg = w.shape[:2]
        diag = xp.ones((G, Cg), dtype=w.dtype) if log_diag is None else xp.exp(log_diag)
        idx = xp.arange(Cg)
        w[:, idx, idx, self.k - 1, self.k - 1] = diag
        return w if dtype is None else w.astype(dtype)

    def _kernel_weight(self, dtype):
        """The effective weight in the kernels' layout (G, k, k, C_in, C_out), contiguous; an
        upper self-tap's channels reversed (``_to_kernel_channels``), so that it is lower."""
        w = self.effective_weight(dtype).transpose(0, 3, 4, 2, 1)
        return get_array_module(w).ascontiguousarray(self._to_kernel_channels(w))

    def _to_kernel_channels(self, w):
        """(G, k, k, C_in, C_out) with both channel axes reversed for an upper self-tap (the
        kernels see its channels reversed, ``_flips``); unchanged for a lower one. Its own
        inverse: it also takes the kernels' weight gradient back to the layer's channels."""
        return w[:, :, :, ::-1, ::-1] if self.self_tap == "upper" else w

    # ---- layout: (B, C, H, W) <-> the kernels' grouped layout, in top-left form ---------
    def _flips(self):
        """(G, 3) int8: does group g reverse its rows, its columns (into the top-left form),
        its channels (into a lower-triangular self-tap)."""
        reverse_channels = self.self_tap == "upper"
        return np.array([_FLIPS[corner] + (reverse_channels,) for corner in self.corners],
                        dtype=np.int8)

    def _opposite_flips(self):
        """``_flips`` with rows and columns toggled (the transposed convolution's corners)
        and the channels as they are."""
        flips = self._flips()
        flips[:, :2] = 1 - flips[:, :2]
        return flips

    # ---- the layer contract -------------------------------------------------------------
    def logdet(self, B, H, W, xp, dtype):
        """(B,) log|det| = H·W·Σ s with a learned diagonal, else 0."""
        _, log_diag = self._grouped(self.params)
        if log_diag is None:
            return xp.zeros(B, dtype=dtype)
        return xp.full(B, H * W * log_diag.sum(), dtype=dtype)

    def forward(self, x):
        """y, logdet = the masked convolution of x (B, C, H, W); logdet (B,)."""
        self._prepare(x, "x")
        xp = get_array_module(x)
        kernel = kernels.for_array(x)
        xg = kernel.to_groups(x, self._flips())
        yg = kernel.conv_forward(xg, self._kernel_weight(x.dtype))
        self._cache = (xg, x.shape)
        B, _, H, W = x.shape
        y = kernel.from_groups(yg, self._flips(), B)
        bias = self._bias_image(y.dtype)
        if bias is not None:
            y += bias
        return y, self.logdet(B, H, W, xp, x.dtype)

    def inverse(self, y, method=None):
        """x with forward(x)[0] == y. ``method``: "wavefront", anti-diagonal after anti-diagonal
        (H+W-1 sequential steps); "raster", pixel after pixel (H·W sequential steps, the
        published CInC and Emerging way, kept as the baseline); None: ``self.inverse_method``
        ("wavefront" unless set, e.g. by bench/sampling.py to time the published CInC)."""
        method = self.inverse_method if method is None else method
        if method not in ("wavefront", "raster"):
            raise ValueError(f"unknown inverse method {method!r}: choose wavefront or raster")
        self._prepare(y, "y")
        kernel = kernels.for_array(y)
        bias = self._bias_image(y.dtype)
        if bias is not None:
            y = y - bias
        solve = kernel.wavefront_inverse if method == "wavefront" else kernel.raster_inverse
        xg = solve(kernel.to_groups(y, self._flips()), self._kernel_weight(y.dtype))
        return kernel.from_groups(xg, self._flips(), y.shape[0])

    def backward(self, dy, dlogdet):
        """dx from dy (B, C, H, W) and dlogdet (B,); adds dL/dweight (and dL/dlog_diag).

        dx      = the transposed masked convolution of dy (kernel tap flipped, channels swapped):
                  the forward kernel run on dy with every group's flips reversed and the
                  channels of w swapped (``kernels.input_grad_by_flips``; the flips are done
                  by the layout conversion, at no extra cost)
        dW_eff  = sum_{n,i,j} dy[n, co, i, j] * x[n, ci, i-(k-1)+a, j-(k-1)+b]
        dweight = dW_eff ⊙ mask                       (masked entries and diagonal get 0)
        dlog_diag[c] = dW_eff[c, c, k-1, k-1] * exp(s_c) + H·W·Σ_n dlogdet[n]
        dbias[c]     = sum_{n,i,j} dy[n, c, i, j]
        """
        cache = getattr(self, "_cache", None)
        check_gradient(dy, None if cache is None else cache[1])
        check_images(dy, "dy", self.channels, finite=False)
        xg, shape = cache
        kernel = kernels.for_array(dy)
        dy = dy.astype(xg.dtype, copy=False)
        flips, opposite_flips = self._flips(), self._opposite_flips()
        dyg = kernel.to_groups(dy, flips)
        w_transposed = self._kernel_weight(xg.dtype).transpose(0, 1, 2, 4, 3)
        dxg = kernel.conv_forward(kernel.to_groups(dy, opposite_flips),
                                  get_array_module(dy).ascontiguousarray(w_transposed))
        dw_kernel = kernel.conv_weight_grad(xg, dyg, self.k)    # (G, k, k, C_in, C_out)
        dw_eff = self._to_kernel_channels(dw_kernel).transpose(0, 4, 3, 1, 2)  # (G, C_out, C_in, k, k)
        if self.has_bias:
            self.grads["bias"] += dy.sum(axis=(0, 2, 3)).reshape(self.grads["bias"].shape)

        dweight, dlog_diag = self._grouped(self.grads)
        dweight += (dw_eff * self._mask).astype(dweight.dtype)
        if dlog_diag is not None:
            _, log_diag = self._grouped(self.params)
            Cg = log_diag.shape[1]
            H, W = shape[2], shape[3]
            idx = get_array_module(dy).arange(Cg)
            d_diag = dw_eff[:, idx, idx, self.k - 1, self.k - 1]
            dlog_diag += (d_diag * get_array_module(dy).exp(log_diag)
                          + H * W * dlogdet.sum()).astype(dlog_diag.dtype)
        return kernel.from_groups(dxg, opposite_flips, dy.shape[0])


class InvConv(GroupedMaskedConv):
    """The masked k×k invertible convolution (FInC's unit conv; CInC's with ``learn_diag``).

    params: "weight" (C, C, k, k); with ``learn_diag`` also "log_diag" (C,); with ``bias``
    also "bias" (C,).

    >>> import numpy as np, nfcore
    >>> y = np.random.default_rng(0).standard_normal((2, 3, 8, 8))
    >>> x = nfcore.InvConv(k=3).inverse(y)
    """

    def __init__(self, k=3, channels=None, corner="top-left", learn_diag=False, dtype=None, seed=0,
                 self_tap="lower", bias=False, init_std=None):
        super().__init__(k, (corner,), channels, learn_diag, dtype, seed, self_tap, bias, init_std)

    @property
    def corner(self):
        return self.corners[0]

    def _build(self, channels, xp, dtype):
        super()._build(channels, xp, dtype)
        self.params = {name: p[0] for name, p in self.params.items()}   # drop the group axis
        self.zero_grad()

    def _grouped(self, arrays):
        log_diag = arrays.get("log_diag")
        return arrays["weight"][None], None if log_diag is None else log_diag[None]
