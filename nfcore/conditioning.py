"""How much an inverse amplifies rounding error, and the checks built on it.

The masked convolution's inverse (InvConv, FInC unit, CInC) is a recursion over anti-diagonals,
a two-dimensional IIR filter: each pixel is solved from its already solved neighbours,

    x[i, j] = L⁻¹ (y[i, j] − Σ_{taps ≠ self} W_tap · x[neighbour]).

It is exact in exact arithmetic, but a rounding error made at one pixel is fed forward through
every later anti-diagonal. When the off-centre taps are small the recursion is stable and the
error stays at the level of the unit roundoff ε; past a point it grows geometrically with the
number of anti-diagonals, H + W − 1, and the inverse returns finite numbers that are wrong.
Measured on ``InvConv(k=3, channels=12)`` with off-centre taps drawn N(0, σ²) (bench/stability.py,
float32, x ~ N(0, 1)): σ = 0.05 keeps max |inverse(forward(x)) − x| near 1e-6 up to 128×128;
σ = 0.1 reaches 3e-4 at 64×64 and O(1) at 128×128; σ = 0.2 is wrong from 32×32 on.

The affine couplings are the other inverse that can amplify: x_b = y_b / s − shift divides by
the scale s = sigmoid(raw + 2), and on inputs unlike the training data the networks can drive
raw far below zero (log s ≈ −40 on the digits model's 4×-size inputs, measured), so that the
rounding errors of every layer above are multiplied by 1/s on the way down. That one does not
grow with the image size; it comes with inputs the networks were not trained on.

**The measure.** The inverse's error amplification at an image size,

    amplification = max |inverse(forward(x)) − x| / (ε · max |x|),

on a random input x of that size, ε the unit roundoff of the model's dtype (2⁻²⁴ for float32):
the rounding errors of the round trip, expressed in units of the dtype's own precision. For a
Flow the round trip is ``decode(encode(x))`` (every layer's inverse, Splits with their kept z2).
Each layer's forward pass is a short sum of products (and the couplings' product with s, which
is where information can be squashed below rounding), so what the round trip measures is the
inverse's amplification. It is cheap (one forward and one inverse of a batch
of 2) and makes no assumption about the model, and a value of A means log2(A) of the dtype's 24
(float32) or 53 (float64) significant bits are lost: above ``AMPLIFICATION_LIMIT`` = 1000
(10 bits; a float32 error near 1e-4 on unit-scale data) the inverse is not to be trusted at that
size. Expressed in units of ε, the same weights give about the same amplification in float32 and
float64 (until float32 overflows), so it is a property of the weights and the size, not of the
dtype. Layers and flows are convolutional, so the size asked for may be larger than the size the
model was trained at: that is what the measure is for.

A second measure of the same quantity that needs no round trip, and where the answer lies beyond
what float32 can hold: ``inverse_gain(layer, shape)``, max |M⁻¹ v| / max |v| for a random v, by
one float64 inverse of a masked convolution M. Rounding errors of size ε·|y| injected at every
pixel are amplified by about this factor.

**The checks** (why they raise rather than warn: a wrong answer that looks like a right one is
the failure they exist to stop; a warning in a long log is easy to miss, and a caller that wants
to carry on can catch ``InverseAccuracyError``):

- ``SensitivityProbe``, the sample check: ``Flow.sample`` adds to its batch one probe copy
  of the first image's latents and, before every layer's inverse, pushes it away from the
  first image by δ = 1e-3 · max |h| · r, r ~ N(0, 1), h that layer's input in the probe row: each
  layer's inverse receives a perturbation like its rounding error, 1e-3 instead of ε in size,
  and carries it down to the image with the gain of the inverses below it. The sample's
  rounding error is then estimated as (ε / 1e-3) · max |x_probe − x₀|: the same quantity as
  the round trip's (bench/stability.py compares them). Why not re-encode the sample: the
  forward pass of a wrongly inverted sample gives back its latents to rounding (a substitution
  solve is backward stable: its residual is tiny even when its error is not), so only a second
  inverse can see the error; riding along in the batch, it costs one image of n + 1 instead of
  a forward and an inverse of one image (B = 1 leaves the batch-last kernels' SIMD lanes
  empty). Its share of a sampling call of 3×64×64 images, measured by ``bench/stability.py
  --check-cost`` (paired rounds, median ratio): 4.0-6.9% at n = 64, 0-4% at 100, 8.6-9.7% at
  8 and 10.6-11.4% at 16; for a handful of samples one more image is a larger share.
- ``InputFingerprints``, the memory-saving check: the forward pass keeps, for each layer's input
  h, two numbers per sample, ⟨h, r⟩ with a fixed random r ~ N(0, 1) of one image's shape and
  ‖h‖. When backward rebuilds that input with ``inverse`` as h + e, ⟨r, e⟩ is a N(0, ‖e‖²) draw
  whatever e's shape (spread out or piled in one corner, as the recursion's errors are), so
  |⟨r, h + e⟩ − ⟨r, h⟩| / ‖h‖ estimates the relative error ‖e‖ / ‖h‖ of the rebuilt input, the
  size that the gradients computed from it are off by. O(B) memory per layer and one pass over
  each input; its own rounding, ~ε·√(C·H·W), is far below the tolerance.
"""
import numpy as np

from .backend import get_array_module, to_numpy

AMPLIFICATION_LIMIT = 1000.0   # above this the inverse has lost ~10 of float32's 24 bits
SAMPLE_TOLERANCE = 1e-3        # sample check: the probe's estimated error of the samples, data in [−0.5, 0.5]
RECOMPUTE_TOLERANCE = 1e-3     # memory-saving check: relative error of a rebuilt layer input
PERTURBATION = 1e-3            # the sample check's δ: large against rounding, small against curvature
GUARD_GAIN = 10.0              # the training guard's bound on each masked conv's inverse_gain
GUARD_SHRINK = 0.9             # ... and the factor it scales the off-centre taps by until within it
GUARD_ROUNDS = 100             # ... at most this many times per layer and call (0.9^100 ≈ 3e-5)


def masked_convs_with_sizes(flow):
    """[(layer, (C, H, W))] for every masked convolution of a Flow, with the shape of its input
    at the flow's own image size (``Flow.layer_input_shapes``)."""
    from .layers import EmergingConv
    from .layers.invconv import GroupedMaskedConv

    found = []
    for layer, shape in flow.layer_input_shapes():
        if isinstance(layer, GroupedMaskedConv):
            found.append((layer, shape))
        elif isinstance(layer, EmergingConv):
            found += [(part, shape) for part in layer.parts.values()]
    return found


def guard_conditioning(flow, scale=4, max_gain=None, shrink=None, seed=0, rounds=None,
                       gave_up=None):
    """The training-time guard of the masked convolutions (the couplings have theirs in the
    model: ``Flow(..., scale_bound=c)``, layers/coupling.py): keep every masked convolution's
    inverse well conditioned at
    ``scale`` times the flow's image size. For each one whose ``inverse_gain`` at that size
    exceeds ``max_gain`` (default GUARD_GAIN), scale its off-centre taps by ``shrink`` (default
    GUARD_SHRINK) until it does not, at most ``rounds`` times (default GUARD_ROUNDS; the
    self-tap, its triangle and diagonal, is left alone: it does not act across pixels, and
    when it alone amplifies more than ``max_gain`` no shrinking helps). A gain ≤ 10 keeps the
    layer's share of the rounding error within ~3 of float32's 24 bits at that size. The
    probes run where the weights live (NumPy or CuPy), and the weights are scaled in place
    there.

    Returns the number of layers rescaled. ``gave_up``: a list that gets, for each layer still
    above ``max_gain`` after ``rounds`` rescales, a line naming it and its gain (train.run
    warns with it). Cost: one float64 inverse of a single image at ``scale``× per masked
    convolution (and one more per rescale); the trainer calls it every few steps
    (train.run --guard)."""
    max_gain = GUARD_GAIN if max_gain is None else max_gain
    shrink = GUARD_SHRINK if shrink is None else shrink
    rounds = GUARD_ROUNDS if rounds is None else rounds
    rescaled = 0
    for index, (layer, (C, H, W)) in enumerate(masked_convs_with_sizes(flow)):
        shape = (C, scale * H, scale * W)
        weight, k = layer.params["weight"], layer.k
        gain, done = inverse_gain(layer, shape, seed), 0
        while gain > max_gain and done < rounds:
            self_tap = weight[..., k - 1, k - 1].copy()
            weight *= shrink
            weight[..., k - 1, k - 1] = self_tap
            done += 1
            gain = inverse_gain(layer, shape, seed)
        rescaled += done > 0
        if gain > max_gain and gave_up is not None:
            gave_up.append(f"masked convolution {index} ({type(layer).__name__}, {C} channels): "
                           f"inverse gain {gain:.3g} > {max_gain:g} at {shape[1]}x{shape[2]} "
                           f"after {done} rescales")
    return rescaled


class InverseAccuracyError(ValueError):
    """An inverse returned finite numbers that are wrong beyond a tolerance (an ill-conditioned
    masked-convolution recursion). A ValueError like NonFiniteError: the command lines report it
    in one line, and the trainer skips a step that raises it."""


def unit_roundoff(dtype):
    """ε of a float dtype: 2⁻²⁴ for float32, 2⁻⁵³ for float64."""
    return float(np.finfo(dtype).eps) / 2


def _is_flow(model):
    return hasattr(model, "encode") and hasattr(model, "decode")


def round_trip(model, x):
    """inverse(forward(x)) for a layer, decode(encode(x)) for a Flow."""
    if _is_flow(model):
        return model.decode(model.encode(x))
    y, _ = model.forward(x)
    return model.inverse(y)


def round_trip_error(model, x):
    """max |round_trip(model, x) − x| (inf when the round trip overflowed to NaN/Inf)."""
    from .layers import NonFiniteError

    xp = get_array_module(x)
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            error = float(xp.abs(round_trip(model, x) - x).max())
    except NonFiniteError:               # a layer refused the NaN/Inf an inverse produced
        return float("inf")
    return error if np.isfinite(error) else float("inf")


def random_input(model, image_shape, batch=2, seed=0, dtype=None, xp=np):
    """A random input for ``model`` at ``image_shape`` (C, H, W): N(0, 1) for a layer,
    U[−0.5, 0.5) (dequantized data's range) for a Flow."""
    rng = np.random.default_rng(seed)
    shape = (batch,) + tuple(image_shape)
    x = rng.uniform(-0.5, 0.5, shape) if _is_flow(model) else rng.standard_normal(shape)
    return xp.asarray(x, dtype=dtype or _model_dtype(model))


def _model_dtype(model):
    if _is_flow(model):
        return model.dtype
    params = list(model.params.values())
    return params[0].dtype if params else np.float32


def amplification(model, image_shape, batch=2, seed=0, dtype=None, xp=np):
    """The inverse's error amplification at ``image_shape`` (C, H, W), see the module docstring:

        max |round_trip(x) − x| / (ε · max |x|),   x random of shape (batch, C, H, W)

    for a layer (inverse(forward(x))) or a Flow (decode(encode(x))). inf when the round trip
    overflows. ``dtype`` defaults to the model's.
    """
    x = random_input(model, image_shape, batch, seed, dtype, xp)
    scale = float(xp.abs(x).max())
    return round_trip_error(model, x) / (unit_roundoff(x.dtype) * scale)


def is_well_conditioned(model, image_shape, limit=AMPLIFICATION_LIMIT, **kwargs):
    """True when ``amplification(model, image_shape)`` is at most ``limit``."""
    return amplification(model, image_shape, **kwargs) <= limit


def inverse_gain(layer, image_shape, seed=0):
    """max |M⁻¹ v| / max |v| for one random v ~ N(0, 1) of shape (1, C, H, W), computed in
    float64: how much the masked convolution's inverse M⁻¹ amplifies a perturbation of its
    input at that size. Reaches values float32 cannot represent (σ = 0.2 at 128×128: ~1e33).
    A layer with a bias b inverts y to M⁻¹(y − b): M⁻¹ v is inverse(v) − inverse(0). v is made
    where the layer's weights live (a CuPy array for a layer on the GPU), the gain read back
    on the host."""
    v = np.random.default_rng(seed).standard_normal((1,) + tuple(image_shape))
    weights = list(layer.params.values())
    xp = get_array_module(weights[0]) if weights else np
    probe = xp.asarray(v)
    with np.errstate(over="ignore", invalid="ignore"):
        u = to_numpy(layer.inverse(probe)) - to_numpy(layer.inverse(xp.zeros_like(probe)))
    gain = float(np.abs(u).max() / np.abs(v).max())
    return gain if np.isfinite(gain) else float("inf")


class InputFingerprints:
    """The memory-saving check (module docstring): ``keep(h)`` each layer's input in the forward
    pass, in order; ``error(index, h)`` is the estimated relative error of the rebuilt input
    of layer ``index``, worst over the batch (inf when it holds NaN/Inf):

        max_n |⟨r, ĥ_n⟩ − ⟨r, h_n⟩| / ‖h_n‖,       r ~ N(0, 1) fixed for each image shape.
    """

    def __init__(self, seed=0):
        self.seed = seed
        self.probes = {}          # image shape -> r, flattened, in the arrays' module and dtype
        self.kept = []            # per layer: (⟨r, h⟩ (B,), ‖h‖ (B,))

    def _probe(self, h):
        xp = get_array_module(h)
        key = (tuple(h.shape[1:]), np.dtype(h.dtype).str, xp.__name__)
        if key not in self.probes:
            r = np.random.default_rng(self.seed).standard_normal(int(np.prod(h.shape[1:])))
            self.probes[key] = xp.asarray(r, dtype=h.dtype)
        return self.probes[key]

    def _project(self, h):
        xp = get_array_module(h)
        rows = h.reshape(h.shape[0], -1)
        return rows @ self._probe(h), xp.sqrt(xp.sum(xp.square(rows, dtype=xp.float64), axis=1))

    def keep(self, h):
        self.kept.append(self._project(h))

    def error(self, index, h):
        xp = get_array_module(h)
        projection, norm = self.kept[index]
        with np.errstate(over="ignore", invalid="ignore"):
            rebuilt, _ = self._project(h)
            worst = float((xp.abs(rebuilt - projection) / xp.maximum(norm, 1e-300)).max())
        return worst if np.isfinite(worst) else float("inf")


class SensitivityProbe:
    """The sample check (module docstring). ``extend`` a latent batch z (n, ...) to (n + 1, ...)
    = [z, z₀], z₀ its first image; ``perturb`` h (n + 1, ...) before each layer's inverse: the
    probe row becomes h_probe + δ, δ = PERTURBATION · max |h_probe| · r, r a window of N(0, 1)
    draws made once per sampling call (``size`` of them: an image's number of values, the most
    any layer's input holds per image), each layer's window starting elsewhere, from a fixed
    seed (the caller's generator is not touched); after the last inverse, ``error(x, dtype)``
    is the samples' estimated rounding error from the probe row and the first sample:

        ε / PERTURBATION · max |x_probe − x₀|               (inf when either overflowed).
    """

    def __init__(self, n, size, seed=0):
        self.n = n
        self.size = size
        self.draws = np.random.default_rng(seed).standard_normal(2 * size)
        self.start = 0

    def extend(self, z):
        xp = get_array_module(z)
        return xp.concatenate([z, z[:1]])

    def perturb(self, h):
        """h with its probe row pushed away from its first row, in place (h is an inverse's
        fresh output)."""
        xp = get_array_module(h)
        if not isinstance(self.draws, xp.ndarray) or self.draws.dtype != h.dtype:
            self.draws = xp.asarray(self.draws, dtype=h.dtype)     # once per sampling call
        count = h[self.n].size
        window = self.draws[self.start:self.start + count].reshape(h.shape[1:])
        self.start = (self.start + 1031) % self.size               # the next layer's window
        with np.errstate(over="ignore", invalid="ignore"):
            # the scale stays on the device (a 0-d array): no wait
            scale = PERTURBATION * xp.abs(h[self.n]).max()
            h[self.n] += scale * window
        return h

    def error(self, x, dtype):
        xp = get_array_module(x)
        with np.errstate(over="ignore", invalid="ignore"):
            spread = float(xp.abs(x[self.n] - x[0]).max())
        error = unit_roundoff(dtype) / PERTURBATION * spread
        return error if np.isfinite(error) else float("inf")
