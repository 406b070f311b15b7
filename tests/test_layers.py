"""One harness for every invertible layer: adding a layer is one line in CASES.

Each case runs ``nfcore.reference.check_layer`` (the same checks users can run), float64 unless
said, after putting random values into the parameters (perturb=0.1) so that zero-initialized
parts are not trivially zero:

- inverse(forward(x)) == x: float64 to 1e-10, float32 to 1e-4 (relative to max |x|);
- the forward logdet against slogdet of the dense Jacobian built from backward (for Split:
  against SciPy's Gaussian logpdf, its second output being log p(z2 | z1)): 1e-10 relative;
- backward against central finite differences along random directions, for x and for every
  parameter, with L = Σ y·g + Σ logdet·h (so dlogdet ≠ 0 is covered): 1e-6 relative with
  ε = 1e-6 (rounding ~1e-10, truncation ~1e-12: 1e-6 leaves room without hiding a bug, which
  shows up as O(1) errors).

Then: zero-initialized layers start where they should, state round trips, and bad input gives
clear errors. The networks' pieces (nfcore.nn, channel-last) are checked through the couplings
and Split, and on their own: Conv2d (both expansion sides) against SciPy's correlate2d and the
definitions of its gradients, Conv2d, Conv2dZero and Network against finite differences, and
the Numba im2col / col2im against their NumPy references.
"""
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pytest
import scipy.signal
import scipy.stats

import nfcore
from nfcore import reference
from nfcore.layers import (ActNorm, AffineCoupling, Conv1x1, EmergingConv, FInCUnit, GaussianPrior,
                           InvConv, Logit, QuadCoupling, Split, Squeeze)
from nfcore.nn import Conv2d, Conv2dZero, Network


@dataclass(frozen=True)
class Case:
    name: str
    make: object                 # () -> a fresh layer (lazy: weights made on its first input)
    shape: tuple = (2, 4, 4, 4)  # B, C, H, W
    data: str = "normal"         # "normal": N(0, 1); "unit": U(-0.45, 0.45) (Logit's range)


CASES = [
    Case("InvConv[top-left]", lambda: InvConv(3, corner="top-left", seed=1)),
    Case("InvConv[top-right,diag]", lambda: InvConv(3, corner="top-right", learn_diag=True, seed=2)),
    Case("InvConv[bottom-left]", lambda: InvConv(2, corner="bottom-left", seed=3)),
    Case("InvConv[bottom-right,diag]", lambda: InvConv(3, corner="bottom-right", learn_diag=True, seed=4)),
    Case("FInCUnit", lambda: FInCUnit(3, seed=5)),
    Case("FInCUnit[diag]", lambda: FInCUnit(3, learn_diag=True, seed=6)),
    Case("EmergingConv", lambda: EmergingConv(3, seed=7)),
    Case("ActNorm", lambda: ActNorm()),
    Case("Conv1x1", lambda: Conv1x1(seed=8)),
    Case("Conv1x1[C=5]", lambda: Conv1x1(seed=9), shape=(2, 5, 3, 3)),
    Case("AffineCoupling", lambda: AffineCoupling(hidden=8, seed=10)),
    Case("AffineCoupling[C=5,actnorm]", lambda: AffineCoupling(hidden=8, actnorm=True, seed=11),
         shape=(2, 5, 3, 4)),
    Case("AffineCoupling[scale_bound]", lambda: AffineCoupling(hidden=8, seed=14, scale_bound=0.3)),
    Case("QuadCoupling", lambda: QuadCoupling(hidden=8, seed=12)),
    Case("QuadCoupling[scale_bound]", lambda: QuadCoupling(hidden=8, seed=15, scale_bound=0.3)),
    Case("QuadCoupling[C=6]", lambda: QuadCoupling(hidden=8, seed=13), shape=(2, 6, 3, 3)),
    Case("Squeeze", lambda: Squeeze(), shape=(2, 3, 4, 6)),
    Case("Split", lambda: Split()),
    Case("Split[C=5]", lambda: Split(), shape=(2, 5, 3, 3)),
    Case("Logit", lambda: Logit(), data="unit"),
]
IDS = [case.name for case in CASES]


def make_input(case, dtype=np.float64, seed=1):
    rng = np.random.default_rng(seed)
    if case.data == "unit":
        return rng.uniform(-0.45, 0.45, case.shape).astype(dtype)
    return rng.standard_normal(case.shape).astype(dtype)


@lru_cache(maxsize=None)
def float64_errors(name):
    """check_layer's errors for one case, computed once and shared by the tests below."""
    case = next(case for case in CASES if case.name == name)
    return reference.check_layer(case.make(), make_input(case), perturb=0.1)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_inverse_float64(case):
    assert float64_errors(case.name)["inverse"] <= 1e-10


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_inverse_float32(case):
    layer = case.make()
    x = make_input(case, np.float32)
    y, logdet = layer.forward(x)
    assert y.dtype == np.float32 and logdet.dtype == np.float32 and logdet.shape == (x.shape[0],)
    assert reference.check_layer(layer, x, perturb=0.1)["inverse"] <= 1e-4


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_logdet_matches_dense_jacobian(case):
    assert float64_errors(case.name)["logdet"] <= 1e-10


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backward_matches_finite_differences(case):
    errors = float64_errors(case.name)
    worst = {key: value for key, value in errors.items() if key.startswith("backward[")}
    assert "backward[x]" in worst
    assert max(worst.values()) <= 1e-6, worst


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_parameter_is_checked(case):
    layer = case.make()
    layer.forward(make_input(case))
    errors = float64_errors(case.name)
    assert {f"backward[{name}]" for name in layer.params} <= set(errors)
    assert set(layer.grads) == set(layer.params)


# ---- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_input_raises_clear_errors(case):
    layer = case.make()
    x = make_input(case)
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(x, np.zeros(x.shape[0]))
    with pytest.raises(ValueError, match="4 dimensions"):
        layer.forward(x[0])
    with pytest.raises(TypeError, match="float32 or float64"):
        layer.forward(x.astype(np.int64))
    with pytest.raises(TypeError, match="NumPy or CuPy array"):
        layer.forward(x.tolist())
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        layer.forward(bad)
    layer.forward(x)
    if getattr(layer, "channels", None) is not None:
        wrong = np.concatenate([x, x], axis=1)
        with pytest.raises(ValueError, match="channels"):
            layer.forward(wrong)


def test_layer_specific_errors():
    with pytest.raises(ValueError, match="even height and width"):
        Squeeze().forward(np.zeros((1, 2, 3, 4)))
    with pytest.raises(ValueError, match="at least 4 channels"):
        QuadCoupling(hidden=4).forward(np.zeros((1, 3, 4, 4)))
    with pytest.raises(ValueError, match="at least 2 channels"):
        Split().forward(np.zeros((1, 1, 4, 4)))
    with pytest.raises(ValueError, match=r"\[-0.5, 0.5\]"):
        Logit().forward(np.full((1, 1, 2, 2), 0.7))
    with pytest.raises(ValueError, match="alpha"):
        Logit(alpha=0.5)
    with pytest.raises(ValueError, match="odd"):
        Conv2d(4, kernel_size=2)
    with pytest.raises(RuntimeError, match="before initialization"):
        ActNorm(channels=3).inverse(np.zeros((1, 3, 2, 2)))
    split = Split()
    split.forward(np.zeros((1, 4, 2, 2)))
    with pytest.raises(ValueError, match="z2 has shape"):
        split.inverse(np.zeros((1, 2, 2, 2)), z2=np.zeros((1, 3, 2, 2)))
    # an inverse that runs the networks replaces their caches: a stale backward is refused
    for layer in [AffineCoupling(hidden=4), Split()]:
        y, _ = layer.forward(np.ones((1, 4, 2, 2)))
        layer.inverse(y)
        with pytest.raises(RuntimeError, match="before forward"):
            layer.backward(y, np.zeros(1))


# ---- zero-initialized layers start where they should ----------------------------------------
def test_couplings_start_as_a_fixed_scaling():
    """h = 0 at the start: y_1 = z_1 and every other block is z · sigmoid(2) (as in Glow)."""
    x = np.random.default_rng(0).standard_normal((2, 6, 3, 3))
    s = 1 / (1 + math.exp(-2))
    for layer, kept in [(AffineCoupling(hidden=8), 3), (QuadCoupling(hidden=8), 1)]:
        y, logdet = layer.forward(x)
        assert np.array_equal(y[:, :kept], x[:, :kept])
        np.testing.assert_allclose(y[:, kept:], s * x[:, kept:], rtol=1e-14)
        np.testing.assert_allclose(logdet, (6 - kept) * 9 * math.log(s), rtol=1e-14)


def test_scale_bound_bounds_the_inverse_gain():
    """With scale_bound c, log s lies in [−c, 0] however far the network's output goes, so the
    inverse multiplies an error in y by at most e^c; where s is not small it is Glow's s."""
    from nfcore.layers.coupling import _log_scale
    raw = np.array([-200.0, -40.0, -2.0, 0.0, 3.0, 50.0])
    unbounded, _ = _log_scale(raw)
    bounded, slope = _log_scale(raw, 3.0)
    assert unbounded[0] < -190 and np.all(bounded >= -3.0) and np.all(bounded <= 0)
    np.testing.assert_allclose(bounded[3:], unbounded[3:], rtol=2e-3)     # q = 0.13, 0.007, ~0
    np.testing.assert_allclose(slope, (_log_scale(raw + 1e-6, 3.0)[0] - _log_scale(raw - 1e-6, 3.0)[0])
                               / 2e-6, rtol=1e-6, atol=1e-9)   # atol: the difference's resolution, ulp(3) / 2e-6
    layer = AffineCoupling(hidden=8, seed=3, scale_bound=3.0)
    x = np.random.default_rng(4).standard_normal((2, 4, 4, 4))
    layer.forward(x)
    layer.parts["nn"].params["conv3.weight"][...] = -50.0       # raw far below: s -> 0 unbounded
    y, logdet = layer.forward(x)
    assert np.all(logdet >= -3.0 * 2 * 16)
    dy = np.zeros_like(y)
    dy[:, 2:] = 1e-6                                              # an error in y_b ...
    dx = layer.inverse(y + dy) - layer.inverse(y)
    assert np.abs(dx).max() < 1e-6 * np.exp(3.0) * (1 + 1e-6)     # ... grows by at most e^3
    with pytest.raises(ValueError, match="scale_bound"):
        AffineCoupling(hidden=4, scale_bound=0)


def test_split_prior_starts_standard_normal():
    x = np.random.default_rng(1).standard_normal((2, 5, 3, 3))
    layer = Split()
    z1, logp = layer.forward(x)
    assert np.array_equal(z1, x[:, :2]) and np.array_equal(layer.z2, x[:, 2:])
    expected = scipy.stats.norm.logpdf(x[:, 2:]).reshape(2, -1).sum(axis=1)
    np.testing.assert_allclose(logp, expected, rtol=1e-14)


def test_network_and_conv2d_zero_start_at_zero():
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 4))
    assert not Network(6, hidden=8).forward(x).any()           # (B, C, H, W)
    assert not Conv2dZero(5).forward(x).any()                  # channel-last (B, H, W, C)


def test_actnorm_initializes_on_first_batch_only():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 3, 5, 5)) * [[[[2.0]], [[0.5]], [[3.0]]]] + 1.5
    layer = ActNorm()
    y, _ = layer.forward(x)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(y.std(axis=(0, 2, 3)), 1, rtol=1e-5)
    y2, _ = layer.forward(2 * x)           # no second initialization
    np.testing.assert_allclose(y2.std(axis=(0, 2, 3)), 2, rtol=1e-5)


def test_conv1x1_starts_as_a_rotation():
    layer = Conv1x1(channels=6, dtype=np.float64, seed=4)
    W, _, _ = layer.factors(np.float64)
    np.testing.assert_allclose(W @ W.T, np.eye(6), atol=1e-12)
    _, logdet = layer.forward(np.ones((1, 6, 2, 2)))
    assert abs(logdet[0]) < 1e-12


# ---- state and parameters --------------------------------------------------------------------
def test_actnorm_state_round_trip():
    x = np.random.default_rng(5).standard_normal((4, 3, 4, 4))
    trained = ActNorm()
    trained.forward(x)
    restored = ActNorm(channels=3, dtype=np.float64)
    for name, param in trained.params.items():
        restored.params[name][...] = param
    restored.load_state(trained.state())
    assert trained.state() == {"initialized": True}
    np.testing.assert_array_equal(restored.forward(3 * x)[0], trained.forward(3 * x)[0])
    with pytest.raises(KeyError, match="initialized"):
        restored.load_state({})


def test_conv1x1_state_round_trip():
    x = np.random.default_rng(6).standard_normal((2, 5, 3, 3))
    trained = Conv1x1(seed=1)
    trained.forward(x)
    restored = Conv1x1(seed=2)            # another permutation and signs until loaded
    restored.load_state(trained.state())
    for name, param in trained.params.items():
        restored.params[name] = param.copy()
    np.testing.assert_array_equal(restored.forward(x)[0], trained.forward(x)[0])


def test_composite_params_are_live_dicts():
    layer = AffineCoupling(hidden=8, actnorm=True, seed=0)
    layer.forward(np.random.default_rng(7).standard_normal((2, 4, 3, 3)))
    assert isinstance(layer.params, dict) and isinstance(layer.grads, dict)
    assert list(layer.params)[:2] == ["nn.conv1.weight", "nn.norm1.bias"]
    assert layer.params["nn.conv1.weight"] is layer.nn.conv1.params["weight"]
    new = np.ones_like(layer.params["nn.conv3.logs"])
    layer.params["nn.conv3.logs"] = new                    # assignment reaches the part
    assert layer.nn.conv3.params["logs"] is new
    with pytest.raises(KeyError):
        layer.params["nn.conv9.weight"] = new
    assert layer.state() == {"nn.norm1.initialized": True, "nn.norm2.initialized": True}
    layer.zero_grad()
    assert all(not g.any() for g in layer.grads.values())


def test_parameter_names():
    x = np.random.default_rng(8).standard_normal((1, 4, 2, 2))
    names = {}
    for layer in [EmergingConv(), Split(), QuadCoupling(hidden=4), Conv1x1(), ActNorm()]:
        layer.forward(x)
        names[type(layer).__name__] = sorted(layer.params)
    assert names["EmergingConv"] == ["conv1.log_diag", "conv1.weight", "conv2.bias", "conv2.log_diag",
                                     "conv2.weight"]
    assert names["Split"] == ["prior.bias", "prior.logs", "prior.weight"]
    assert len(names["QuadCoupling"]) == 21 and "f3.conv3.logs" in names["QuadCoupling"]
    assert names["Conv1x1"] == ["log_s", "lower", "upper"]
    assert names["ActNorm"] == ["bias", "logs"]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_emerging_conv_of_size_k_sees_the_k_by_k_window_as_published(k):
    """EmergingConv(k) is two (k+1)/2 × (k+1)/2 convolutions (Hoogeboom et al. 2019): output
    pixel (i, j) depends on exactly the inputs of the k×k window centred on it. The layer is
    affine (a bias after its second conv), so its response to one input pixel, f(e) − f(0), is
    a column of its Jacobian."""
    C, size, centre = 2, 9, 4
    layer = EmergingConv(k, channels=C, dtype=np.float64, seed=3)
    rng = np.random.default_rng(0)
    for name in layer.params:                   # generic weights: no tap is zero by chance
        layer.params[name][...] = rng.uniform(0.2, 0.6, layer.params[name].shape)
    assert layer.conv1.k == layer.conv2.k == (k + 1) // 2
    x = np.zeros((1, C, size, size))
    x[0, :, centre, centre] = 1.0
    response = layer.forward(x)[0][0] - layer.forward(np.zeros_like(x))[0][0]
    reached = np.abs(response).sum(axis=0) > 0
    window = np.zeros((size, size), bool)
    half = k // 2
    window[centre - half:centre + half + 1, centre - half:centre + half + 1] = True
    np.testing.assert_array_equal(reached, window)


@pytest.mark.parametrize("k", [0, 2, 4])
def test_emerging_conv_needs_an_odd_kernel_size(k):
    with pytest.raises(ValueError, match="odd kernel size"):
        EmergingConv(k)


def test_lazy_parameters_take_the_input_dtype():
    x = np.zeros((1, 4, 2, 2), dtype=np.float32)
    for layer in [AffineCoupling(hidden=4), Conv1x1(), ActNorm(), Split(), EmergingConv()]:
        layer.forward(x + 0.5 * np.arange(16, dtype=np.float32).reshape(1, 4, 2, 2))
        assert {p.dtype for p in layer.params.values()} == {np.dtype(np.float32)}


# ---- Split's sampling and the Gaussian prior ---------------------------------------------------
def test_split_samples_z2_from_its_prior():
    layer = Split()
    x = np.random.default_rng(9).standard_normal((3, 4, 4, 4))
    z1, _ = layer.forward(x)
    layer.params["prior.bias"][...] = np.arange(4.0)       # mean = 0, 1; logs = 2, 3 (· e^0)
    a = layer.inverse(z1, rng=np.random.default_rng(0))
    b = layer.inverse(z1, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(a, b)
    assert np.array_equal(a[:, :2], z1)
    at_zero_temperature = layer.inverse(z1, temperature=0.0)
    np.testing.assert_array_equal(at_zero_temperature[:, 2:], np.broadcast_to([[[[0.0]], [[1.0]]]], (3, 2, 4, 4)))


def test_gaussian_prior():
    z = np.random.default_rng(10).standard_normal((2, 3, 4, 4))
    prior = GaussianPrior()
    logp = prior.forward(z)
    np.testing.assert_allclose(logp, scipy.stats.norm.logpdf(z).reshape(2, -1).sum(axis=1), rtol=1e-14)
    dlogp = np.array([0.5, -2.0])
    np.testing.assert_allclose(prior.backward(dlogp), -z * dlogp[:, None, None, None], rtol=1e-15)
    sample = prior.sample((2, 3, 4, 4), temperature=0.0, rng=np.random.default_rng(0))
    assert sample.shape == (2, 3, 4, 4) and not sample.any()


# ---- the networks' pieces: channel-last Conv2d, im2col / col2im, Network -------------------------
SIDES = ["input", "output"]


def _force_side(conv, side):
    """Make ``conv`` expand the given side whatever its channel counts (both must be right)."""
    conv._expand_input = lambda: side == "input"
    return conv


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("C, O, k", [(3, 4, 1), (3, 4, 3), (3, 4, 5), (5, 2, 3), (5, 2, 1)])
def test_conv2d_matches_scipy_correlate(C, O, k, side):
    """Channel-last x (B, H, W, C); both expansions against SciPy, backward by the definitions."""
    rng = np.random.default_rng(k)
    x = rng.standard_normal((2, 5, 6, C))
    conv = _force_side(Conv2d(O, k, seed=k), side)
    conv.forward(x)
    conv.params["bias"][...] = rng.standard_normal(O)
    y = conv.forward(x)
    w, bias = conv.params["weight"], conv.params["bias"]
    expected = np.stack([[bias[o] + sum(scipy.signal.correlate2d(x[n, :, :, c], w[o, c], mode="same")
                                        for c in range(C)) for o in range(O)] for n in range(2)])
    np.testing.assert_allclose(y, expected.transpose(0, 2, 3, 1), rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    conv.zero_grad()
    dx = conv.backward(dy)                   # the adjoint: <dy, conv(v)> = <dx, v> for any v
    v = rng.standard_normal(x.shape)
    linear = conv.forward(v) - bias
    np.testing.assert_allclose(np.sum(dy * linear), np.sum(dx * v), rtol=1e-12)
    np.testing.assert_allclose(conv.grads["weight"],    # dweight from the definition
                               np.einsum("nhwo,nhwcab->ocab", dy, _patches(x, k)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(conv.grads["bias"], dy.sum(axis=(0, 1, 2)), rtol=1e-12)


def _patches(x, k):
    """(B, H, W, C, k, k): the zero-padded k×k patch around every pixel, written out plainly."""
    B, H, W, C = x.shape
    p = k // 2
    padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    out = np.zeros((B, H, W, C, k, k))
    for i in range(H):
        for j in range(W):
            out[:, i, j] = padded[:, i:i + k, j:j + k].transpose(0, 3, 1, 2)
    return out


def finite_difference_errors(piece, x, eps=1e-6, seed=0):
    """Directional finite-difference checks of a non-invertible piece (forward(x) -> y,
    backward(dy) -> dx), as check_layer does for flow layers: L = Σ y·g, for x and every
    parameter the relative error of <dL/dθ, v> against (L(θ+εv) - L(θ-εv)) / 2ε."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(piece.forward(x).shape)
    piece.zero_grad()
    dx = piece.backward(g)
    grads = {name: grad.copy() for name, grad in piece.grads.items()}

    def loss(inputs):
        return float(np.sum(piece.forward(inputs) * g))

    def relative(analytic, numeric):
        return abs(analytic - numeric) / max(1.0, abs(analytic), abs(numeric))

    v = rng.standard_normal(x.shape)
    errors = {"x": relative(np.sum(dx * v), (loss(x + eps * v) - loss(x - eps * v)) / (2 * eps))}
    for name, param in piece.params.items():
        p0 = param.copy()
        v = rng.standard_normal(param.shape)
        param[...] = p0 + eps * v
        loss_plus = loss(x)
        param[...] = p0 - eps * v
        loss_minus = loss(x)
        param[...] = p0
        errors[name] = relative(np.sum(grads[name] * v), (loss_plus - loss_minus) / (2 * eps))
    return errors


def _perturb(piece, x, rng, scale=0.3):
    """Build piece's parameters on x, then move every one of them off its starting value."""
    piece.forward(x)
    for param in piece.params.values():
        param += scale * rng.standard_normal(param.shape)
    return piece


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("make", [lambda: Conv2d(4, 3, seed=1), lambda: Conv2d(3, 1, seed=2),
                                  lambda: Conv2dZero(4, 3), lambda: Conv2dZero(2, 5)],
                         ids=["Conv2d3x3", "Conv2d1x1", "Conv2dZero3x3", "Conv2dZero5x5"])
def test_conv2d_backward_matches_finite_differences(make, side):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 5, 4, 3))
    conv = _perturb(_force_side(make(), side), x, rng)
    errors = finite_difference_errors(conv, x)
    assert set(errors) == {"x"} | set(conv.params)
    assert max(errors.values()) <= 1e-6, errors


@pytest.mark.parametrize("actnorm", [False, True], ids=["plain", "actnorm"])
def test_network_backward_matches_finite_differences(actnorm):
    """The network as a coupling calls it: channel-first in and out, channel-last inside."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 3, 4, 5))
    net = _perturb(Network(4, hidden=6, actnorm=actnorm, seed=3), x, rng)
    assert net.forward(x).shape == (2, 4, 4, 5)
    errors = finite_difference_errors(net, x)
    assert set(errors) == {"x"} | set(net.params)
    assert max(errors.values()) <= 1e-6, errors


def test_network_float32_stays_float32():
    """No float64 promotion inside: every output, gradient and activation is float32."""
    rng = np.random.default_rng(13)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    for net in [Network(6, hidden=8), Network(6, hidden=8, actnorm=True)]:
        _perturb(net, x, rng)
        for param in net.params.values():
            param[...] = param.astype(np.float32)
        h = net.forward(x)
        dx = net.backward(np.ones_like(h))
        assert h.dtype == dx.dtype == np.float32 and h.flags.c_contiguous and dx.flags.c_contiguous
        assert {g.dtype for g in net.grads.values()} == {np.dtype(np.float32)}
        hidden = net.relu2._cache
        assert hidden.shape == (2, 4, 4, 8) and hidden.flags.c_contiguous   # channel-last


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("B, H, W, C, k", [(2, 5, 6, 3, 3), (1, 4, 3, 2, 5), (3, 2, 2, 4, 3),
                                           (2, 3, 4, 5, 1), (2, 7, 5, 1, 7)])
def test_im2col_numba_matches_numpy(B, H, W, C, k, dtype):
    """The Numba kernels against the NumPy references, and col2im is im2col's transpose."""
    from nfcore.nn import col2im, col2im_numba, col2im_numpy, im2col, im2col_numba, im2col_numpy
    rng = np.random.default_rng(14)
    x = rng.standard_normal((B, H, W, C)).astype(dtype)
    cols = im2col_numba(x, k)
    assert cols.dtype == dtype and cols.shape == (B * H * W, k * k * C)
    np.testing.assert_array_equal(cols, im2col_numpy(x, k))
    np.testing.assert_array_equal(im2col(x, k), cols)
    assert cols[0, :C].tolist() == ([0.0] * C if k > 1 else x[0, 0, 0].tolist())   # padding
    d = rng.standard_normal(cols.shape).astype(dtype)
    back = col2im_numba(d, B, H, W, k)
    assert back.dtype == dtype and back.shape == x.shape
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(back, col2im_numpy(d, x.shape, k), rtol=tol, atol=tol)
    np.testing.assert_allclose(col2im(d, x.shape, k), back, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.sum(cols * d, dtype=np.float64), np.sum(x * back, dtype=np.float64),
                               rtol=tol)


@pytest.mark.parametrize("side", SIDES)
def test_conv2d_on_the_numpy_references_matches_numba(side, monkeypatch):
    """The path CuPy arrays take (im2col_numpy / col2im_numpy), run here on NumPy arrays."""
    import nfcore.nn.patches
    rng = np.random.default_rng(15)
    x = rng.standard_normal((2, 5, 4, 3)).astype(np.float32)
    conv = _perturb(_force_side(Conv2d(4, 3, seed=5), side), x, rng)
    dy = rng.standard_normal((2, 5, 4, 4)).astype(np.float32)
    results = []
    for reference in (False, True):
        monkeypatch.setattr(nfcore.nn.patches, "is_cupy_array", lambda array: reference)
        conv.zero_grad()
        results.append([conv.forward(x), conv.backward(dy), conv.grads["weight"].copy()])
    for numba_result, numpy_result in zip(*results):
        np.testing.assert_allclose(numpy_result, numba_result, rtol=1e-5, atol=1e-5)


def test_conv2d_channel_last_errors():
    conv = Conv2d(4, 3)
    with pytest.raises(ValueError, match="channel-last"):
        conv.forward(np.zeros((2, 3, 4)))
    conv.forward(np.zeros((1, 4, 4, 3)))
    with pytest.raises(ValueError, match="last axis.*built for 3"):
        conv.forward(np.zeros((1, 3, 4, 4)))     # channel-first by mistake
    with pytest.raises(ValueError, match="shape"):
        conv.backward(np.zeros((1, 4, 4, 3)))


def test_exports():
    for name in ["ActNorm", "Conv1x1", "AffineCoupling", "QuadCoupling", "Squeeze", "Split",
                 "EmergingConv", "Logit", "GaussianPrior"]:
        assert getattr(nfcore, name) is getattr(nfcore.layers, name)
