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
clear errors. The networks' pieces (nfcore.nn) are checked through the couplings and Split,
and Conv2d's forward against SciPy's correlate2d.
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
    Case("QuadCoupling", lambda: QuadCoupling(hidden=8, seed=12)),
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


def test_split_prior_starts_standard_normal():
    x = np.random.default_rng(1).standard_normal((2, 5, 3, 3))
    layer = Split()
    z1, logp = layer.forward(x)
    assert np.array_equal(z1, x[:, :2]) and np.array_equal(layer.z2, x[:, 2:])
    expected = scipy.stats.norm.logpdf(x[:, 2:]).reshape(2, -1).sum(axis=1)
    np.testing.assert_allclose(logp, expected, rtol=1e-14)


def test_network_and_conv2d_zero_start_at_zero():
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 4))
    assert not Network(6, hidden=8).forward(x).any()
    assert not Conv2dZero(5).forward(x).any()


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
    assert names["EmergingConv"] == ["conv1.log_diag", "conv1.weight", "conv2.log_diag", "conv2.weight"]
    assert names["Split"] == ["prior.bias", "prior.logs", "prior.weight"]
    assert len(names["QuadCoupling"]) == 21 and "f3.conv3.logs" in names["QuadCoupling"]
    assert names["Conv1x1"] == ["log_s", "lower", "upper"]
    assert names["ActNorm"] == ["bias", "logs"]


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


# ---- the networks' convolution against SciPy ---------------------------------------------------
@pytest.mark.parametrize("C, O, k", [(3, 4, 1), (3, 4, 3), (3, 4, 5), (5, 2, 3), (5, 2, 1)])
def test_conv2d_matches_scipy_correlate(C, O, k):
    """C <= O expands the input side (im2col), C > O the output side: both against SciPy."""
    rng = np.random.default_rng(k)
    x = rng.standard_normal((2, C, 5, 6))
    conv = Conv2d(O, k, seed=k)
    conv.forward(x)
    conv.params["bias"][...] = rng.standard_normal(O)
    y = conv.forward(x)
    w, bias = conv.params["weight"], conv.params["bias"]
    expected = np.stack([[bias[o] + sum(scipy.signal.correlate2d(x[n, c], w[o, c], mode="same")
                                        for c in range(C)) for o in range(O)] for n in range(2)])
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    conv.zero_grad()
    dx = conv.backward(dy)                   # the adjoint: <dy, conv(v)> = <dx, v> for any v
    v = rng.standard_normal(x.shape)
    linear = conv.forward(v) - bias[None, :, None, None]
    np.testing.assert_allclose(np.sum(dy * linear), np.sum(dx * v), rtol=1e-12)
    np.testing.assert_allclose(conv.grads["weight"],    # dweight from the definition
                               np.einsum("nohw,nchwab->ocab", dy, _patches(x, k)), rtol=1e-12, atol=1e-12)


def _patches(x, k):
    """(B, C, H, W, k, k): the zero-padded k×k patch around every pixel, written out plainly."""
    B, C, H, W = x.shape
    p = k // 2
    padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    out = np.zeros((B, C, H, W, k, k))
    for i in range(H):
        for j in range(W):
            out[:, :, i, j] = padded[:, :, i:i + k, j:j + k]
    return out


def test_exports():
    for name in ["ActNorm", "Conv1x1", "AffineCoupling", "QuadCoupling", "Squeeze", "Split",
                 "EmergingConv", "Logit", "GaussianPrior"]:
        assert getattr(nfcore, name) is getattr(nfcore.layers, name)
