"""The multi-scale flow of Glow / FInC / CInC: L levels of K steps, squeeze and split.

Shapes, for an image (C, H, W) and L levels::

    x (B, C, H, W)
    level 1:  Squeeze → (4C, H/2, W/2) → K steps → Split → keeps (2C, H/2, W/2)
    level 2:  Squeeze → (8C, H/4, W/4) → K steps → Split → keeps (4C, H/4, W/4)
    ...
    level L:  Squeeze → K steps → z_top                   (no split on the last level)

One step, by ``invconv`` (the k×k invertible convolution under study, or Glow's 1×1 alone):

    finc      FInCUnit(k) → ActNorm → Conv1x1 → coupling        (FInC Flow)
    cinc      ActNorm → CInCConv(k) → coupling                  (CInC Flow, published layer)
    emerging  ActNorm → Conv1x1 → EmergingConv(k) → coupling     (Hoogeboom et al. 2019, published)
    glow1x1   ActNorm → Conv1x1 → coupling                      (Glow)

with ``coupling`` affine (Glow) or quad (CInC). Each Split factors out half of the channels,
z2, and scores it under a Gaussian whose mean and log-std come from the kept half: its
log-likelihood log p(z2 | z1) is returned as the Split's "logdet", so that the flow's

    log p(x) = log N(z_top; 0, I) + Σ_layers logdet_layer

(Splits included) and, for n_bits-bit images with D = C·H·W dimensions,

    bpd = (−log p(x) + D · n_bits · ln 2) / (D · ln 2).
"""
import math

import numpy as np

from .backend import get_array_module
from .conditioning import (RECOMPUTE_TOLERANCE, SAMPLE_TOLERANCE, InputFingerprints, InverseAccuracyError,
                           SensitivityProbe)
from .layers import (ActNorm, NonFiniteError, AffineCoupling, CInCConv, Conv1x1, EmergingConv, FInCUnit,
                     QuadCoupling, Split, Squeeze)
from .layers.base import check_finite, finite_checks_deferred
from .layers.prior import GaussianPrior
from .objective import bits_per_dim

STEP_KINDS = ("finc", "cinc", "emerging", "glow1x1")
COUPLINGS = ("affine", "quad")


def flow_step(invconv, coupling, channels, hidden, k, seed, dtype=np.float32, scale_bound=None):
    """The layers of one flow step on ``channels`` channels (see the module docstring);
    ``scale_bound``: the couplings' bound on |log s| (layers/coupling.py; None: Glow's form)."""
    if invconv not in STEP_KINDS:
        raise ValueError(f"unknown invconv {invconv!r}: choose one of {', '.join(STEP_KINDS)}")
    if coupling not in COUPLINGS:
        raise ValueError(f"unknown coupling {coupling!r}: choose one of {', '.join(COUPLINGS)}")
    make_coupling = AffineCoupling if coupling == "affine" else QuadCoupling
    C = channels
    couple = make_coupling(channels=C, hidden=hidden, dtype=dtype, seed=seed + 3,
                           scale_bound=scale_bound)
    actnorm = ActNorm(C, dtype=dtype)
    conv1x1 = Conv1x1(C, dtype=dtype, seed=seed + 1)
    if invconv == "finc":
        return [FInCUnit(k=k, channels=C, dtype=dtype, seed=seed), actnorm, conv1x1, couple]
    if invconv == "cinc":
        return [actnorm, CInCConv(k=k, channels=C, dtype=dtype, seed=seed), couple]
    if invconv == "emerging":
        return [actnorm, conv1x1, EmergingConv(k=k, channels=C, dtype=dtype, seed=seed), couple]
    return [actnorm, conv1x1, couple]


class Flow:
    """A multi-scale normalizing flow: a list of invertible layers and a Gaussian top prior.

    ``layers`` is what the optimizer and the checkpoints see (each with params and grads).

    NaN and Inf are checked once per call, not in every layer (on a GPU each check waits for
    the device, see layers/base.py): forward checks its input and outputs, loss_and_backward
    its input and the loss before the backward pass, inverse its latents and the result. Each
    raises NonFiniteError naming what held them.
    """

    def __init__(self, image_shape, levels=3, steps=32, hidden=512, invconv="finc",
                 coupling="affine", k=3, seed=0, dtype=np.float32, scale_bound=None):
        C, H, W = image_shape
        if H % 2 ** levels or W % 2 ** levels:
            raise ValueError(f"{levels} levels halve the image {levels} times: {H}×{W} must be "
                             f"divisible by {2 ** levels}")
        self.image_shape = tuple(image_shape)
        self.dtype = np.dtype(dtype)
        self.config = dict(levels=levels, steps=steps, hidden=hidden, invconv=invconv,
                           coupling=coupling, k=k, seed=seed, scale_bound=scale_bound)
        self.layers = []
        for level in range(levels):
            C = C * 4                                    # after the squeeze
            self.layers.append(Squeeze())
            for step in range(steps):
                self.layers += flow_step(invconv, coupling, C, hidden, k,
                                         seed=seed + 1000 * level + 10 * step, dtype=dtype,
                                         scale_bound=scale_bound)
            if level < levels - 1:
                self.layers.append(Split(channels=C, dtype=dtype))
                C = C // 2                               # the kept half
        self.prior = GaussianPrior()                         # log N(z_top; 0, I)
        self.top_shape = (C, H // 2 ** levels, W // 2 ** levels)   # of z_top
        self.n_dims = int(np.prod(image_shape))

    def layer_input_shapes(self):
        """[(layer, (C, H, W))]: every layer with the shape of one image at its input, at the
        flow's own image size (each Squeeze quadruples C and halves H and W; each Split keeps
        its first C // 2 channels)."""
        C, H, W = self.image_shape
        shapes = []
        for layer in self.layers:
            shapes.append((layer, (C, H, W)))
            if isinstance(layer, Squeeze):
                C, H, W = 4 * C, H // 2, W // 2
            elif isinstance(layer, Split):
                C = layer.kept
        return shapes

    # ---- density -------------------------------------------------------------------------
    def forward(self, x, keep_caches=True):
        """(z_top, logdet): the top latent and Σ of every layer's logdet (Splits included).
        ``keep_caches=False`` drops each layer's cache right after it ran (memory-saving mode)
        and keeps instead two numbers per sample of each layer's input in
        ``self.input_fingerprints`` (``conditioning.InputFingerprints``), against which the
        memory-saving backward checks the inputs it rebuilds. One NaN/Inf check, on x, z_top
        and logdet together."""
        with finite_checks_deferred():
            z, logdet = self._forward(x, keep_caches)
        check_finite({"x": x, "z_top": z, "logdet": logdet})
        return z, logdet

    def _forward(self, x, keep_caches=True):
        """forward without its NaN/Inf check (the layers check their inputs unless deferred)."""
        xp = get_array_module(x)
        logdet = xp.zeros(x.shape[0], dtype=x.dtype)
        h = x
        self.input_fingerprints = InputFingerprints()
        for layer in self.layers:
            if not keep_caches:
                self.input_fingerprints.keep(h)
            h, layer_logdet = layer.forward(h)
            logdet = logdet + layer_logdet
            if not keep_caches:
                layer.release()
        return h, logdet

    def log_prob(self, x):
        """(B,) log p(x) in nats, for dequantized images x (B, C, H, W)."""
        with finite_checks_deferred():
            z, logdet = self._forward(x)
            log_p = self.prior.forward(z) + logdet
        check_finite({"x": x, "log p(x)": log_p})
        return log_p

    def bits_per_dim(self, x, n_bits):
        """(B,) bits per dimension of dequantized n_bits-bit images x."""
        with finite_checks_deferred():
            z, logdet = self._forward(x)
            bpd = bits_per_dim(self.prior.forward(z), logdet, self.n_dims, n_bits)
        check_finite({"x": x, "bits/dim": bpd})
        return bpd

    def loss_and_backward(self, x, n_bits, recompute=False, inverse_tolerance=RECOMPUTE_TOLERANCE):
        """The mean bits/dim of the batch, and its gradient added into every layer's grads.

        loss = mean_n bpd_n, so d loss / d logdet_n = −1 / (B·D·ln 2) for every layer and for
        the prior's log p(z_top)_n alike; the prior turns that into d loss / d z_top.

        ``recompute`` is the memory-saving mode: no layer keeps its activations after the
        forward pass; walking back, each layer's input is rebuilt from its output with
        ``inverse`` and its forward rerun before its backward. Memory for one layer's
        activations instead of all of them, for one inverse and one more forward per layer:
        the reason a fast inverse matters for training too.

        A rebuilt input is only as good as the inverse that rebuilt it: an ill-conditioned
        masked convolution returns finite, wrong activations, and from them wrong gradients
        with a right-looking loss. So each rebuilt input is checked against the fingerprint
        the forward pass kept of it (``conditioning.InputFingerprints``, ≈ ‖error‖/‖h‖); past
        ``inverse_tolerance`` (None: no check) this raises ``InverseAccuracyError`` before any
        wrong gradient reaches the optimizer (the trainer skips the step).
        """
        B = x.shape[0]
        with finite_checks_deferred():
            z, logdet = self._forward(x, keep_caches=not recompute)
            bpd = bits_per_dim(self.prior.forward(z), logdet, self.n_dims, n_bits)
        # the step's one NaN/Inf check, before any gradient is touched; the loss comes with it
        loss = check_finite({"x": x, "the loss (bits/dim)": bpd}, fetch=bpd.mean())
        xp = get_array_module(x)
        dlogdet = xp.full(B, -1.0 / (B * self.n_dims * math.log(2)), dtype=x.dtype)
        dh = self.prior.backward(dlogdet)          # d loss / d log p(z) = d loss / d logdet
        h = z
        with finite_checks_deferred():
            for index in reversed(range(len(self.layers))):
                layer = self.layers[index]
                if recompute:
                    h = layer.inverse(h, z2=layer.z2) if isinstance(layer, Split) else layer.inverse(h)
                    if inverse_tolerance is not None:
                        error = self.input_fingerprints.error(index, h)
                        if error > inverse_tolerance:
                            raise InverseAccuracyError(
                                f"memory-saving backward: the input of layer {index} "
                                f"({type(layer).__name__}) rebuilt by the inverse is off by a "
                                f"relative {error:.1e} (tolerance {inverse_tolerance:g}); its "
                                f"gradients would be wrong. The model's inverse is "
                                f"ill-conditioned: train without --recompute, or with the "
                                f"conditioning guard")
                    layer.forward(h)
                dh = layer.backward(dh, dlogdet)
                if recompute:
                    layer.release()
        return loss, bpd

    # ---- sampling and reconstruction -----------------------------------------------------
    def encode(self, x):
        """All latents of x: [z2 of each Split, ..., z_top], enough to rebuild x exactly."""
        latents = []
        h = x
        with finite_checks_deferred():
            for layer in self.layers:
                h, _ = layer.forward(h)
                if isinstance(layer, Split):
                    latents.append(layer.z2)
        latents.append(h)
        check_finite({"x": x, **{f"latent {index}": z for index, z in enumerate(latents)}})
        return latents

    def decode(self, latents):
        """x from the latents of ``encode`` (exact inverse)."""
        n_splits = sum(isinstance(layer, Split) for layer in self.layers)
        if len(latents) != n_splits + 1:
            raise ValueError(f"decode needs {n_splits + 1} latents (one per split and the "
                             f"top), got {len(latents)}")
        return self.inverse(latents[-1], split_latents=latents[:-1])

    def sample(self, n, temperature=1.0, rng=None, xp=np, dtype=None, tolerance=SAMPLE_TOLERANCE):
        """n images drawn at the given temperature: z ~ N(0, T²) at the top and at every Split.

        With a ``tolerance`` (None: no check) the sampling checks its own inverse: a copy of
        the first sample's latents rides along in the batch (1 of n + 1 images), pushed away
        from it before every layer's inverse by a perturbation like its rounding error, and
        ``conditioning.SensitivityProbe`` turns the distance between the two images into the
        estimated rounding error of the samples, kept in ``self.last_sample_error``. Past the
        tolerance this raises ``InverseAccuracyError``: the samples are finite but are not what
        the model defines, because its inverse amplifies rounding errors (an ill-conditioned
        masked convolution). The n samples are the same with and without the check.
        """
        rng = np.random.default_rng() if rng is None else rng
        dtype = self.dtype if dtype is None else dtype
        z_top = self.prior.sample((n,) + self.top_shape, temperature, rng, dtype, xp)
        self.last_sample_error = None
        try:
            with np.errstate(over="ignore", invalid="ignore"):   # reported below instead
                if tolerance is None:
                    return self.inverse(z_top, temperature=temperature, rng=rng)
                x = self._inverse_with_probes(z_top, temperature, rng)
        except NonFiniteError as error:
            raise NonFiniteError(
                f"sampling diverged at temperature {temperature}: an inverse overflowed to "
                f"NaN/Inf ({error}); the model sends some latents far from the data, try a "
                f"lower temperature") from error
        self.last_sample_error = self._probe.error(x, dtype)
        if self.last_sample_error > tolerance:
            raise InverseAccuracyError(
                f"sampling: the samples' estimated rounding error is {self.last_sample_error:.1e} "
                f"(tolerance {tolerance:g}): the model's inverse amplifies rounding errors at "
                f"{x.shape[2]}×{x.shape[3]}, so its samples are not what it defines (an "
                f"ill-conditioned masked convolution, or a coupling whose scale is near zero "
                f"for some latents: a lower temperature, --scale-bound or --guard helps)")
        return x[:n]

    def _inverse_with_probes(self, z_top, temperature, rng):
        """The inverse of z_top (n images) with one probe image, pushed away from the first
        before every layer's inverse (``conditioning.SensitivityProbe``); the n images get the
        same draws at every Split as ``inverse`` gives them, the probe a copy of the first's."""
        n = len(z_top)
        self._probe = SensitivityProbe(n, size=int(np.prod(self.image_shape)))
        h = self._probe.extend(z_top)
        with finite_checks_deferred():
            for layer in reversed(self.layers):
                h = self._probe.perturb(h)
                if isinstance(layer, Split):
                    z2 = self._probe.extend(layer.draw(h, temperature, rng, rows=n))
                    h = layer.inverse(h, z2=z2)
                else:
                    h = layer.inverse(h)
        check_finite({"z_top": z_top, "x": h})
        return h

    def inverse(self, z_top, split_latents=None, temperature=1.0, rng=None):
        """x from z_top, walking the layers backwards. Each Split takes its z2 from
        ``split_latents`` (in forward order) or, when None, draws it from its prior.
        One NaN/Inf check, on the latents and x together."""
        given = list(split_latents) if split_latents is not None else None
        latents = {"z_top": z_top, **{f"latent {index}": z
                                      for index, z in enumerate(split_latents or [])}}
        h = z_top
        with finite_checks_deferred():
            for layer in reversed(self.layers):
                if isinstance(layer, Split):
                    z2 = given.pop() if given is not None else None
                    h = layer.inverse(h, z2=z2, temperature=temperature, rng=rng)
                else:
                    h = layer.inverse(h)
        check_finite({**latents, "x": h})
        return h

    # ---- state ---------------------------------------------------------------------------
    def state(self):
        """Every layer's non-parameter state (ActNorm flags, fixed permutations, ...)."""
        return [layer.state() for layer in self.layers]

    def load_state(self, states):
        for layer, state in zip(self.layers, states):
            layer.load_state(state)

    def n_params(self):
        return sum(int(p.size) for layer in self.layers for p in layer.params.values())
