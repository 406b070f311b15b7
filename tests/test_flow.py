"""The multi-scale Flow: exact reconstruction, the gradient of the whole loss against finite
differences, sampling, and the bits/dim bookkeeping."""
import math

import numpy as np
import pytest

from nfcore.flow import COUPLINGS, STEP_KINDS, Flow
from nfcore.layers import Split

SHAPE = (2, 8, 8)


def small_flow(invconv, coupling, seed=0, dtype=np.float64):
    return Flow(SHAPE, levels=2, steps=1, hidden=4, invconv=invconv, coupling=coupling, k=3,
                seed=seed, dtype=dtype)


def randomize(flow, x, rng, scale=0.05):
    """Initialize (ActNorm) on x, then give every parameter small random values, so that
    zero-initialized layers do not make their gradients trivially zero."""
    flow.forward(x)
    for layer in flow.layers:
        for param in layer.params.values():
            param[...] += rng.standard_normal(param.shape) * scale


def images(rng, n=3):
    return rng.uniform(-0.5, 0.5, (n,) + SHAPE)


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("invconv", STEP_KINDS)
def test_decode_of_encode_is_exact(invconv, coupling):
    rng = np.random.default_rng(0)
    flow = small_flow(invconv, coupling)
    x = images(rng)
    randomize(flow, x, rng)
    latents = flow.encode(x)
    assert len(latents) == 2 and latents[-1].shape == (3,) + flow.top_shape
    assert sum(z[0].size for z in latents) == x[0].size
    np.testing.assert_allclose(flow.decode(latents), x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("invconv", STEP_KINDS)
def test_loss_gradient_matches_finite_differences(invconv, coupling):
    """Directional check of d(mean bpd)/dθ for every parameter of every layer at once."""
    rng = np.random.default_rng(1)
    flow = small_flow(invconv, coupling)
    x = images(rng)
    randomize(flow, x, rng)
    for layer in flow.layers:
        layer.zero_grad()
    flow.loss_and_backward(x, n_bits=8)
    params = [(layer, name) for layer in flow.layers for name in layer.params]
    directions = [rng.standard_normal(layer.params[name].shape) for layer, name in params]
    analytic = sum(np.sum(layer.grads[name] * v) for (layer, name), v in zip(params, directions))

    def loss_at(t):
        originals = [layer.params[name].copy() for layer, name in params]
        for (layer, name), v in zip(params, directions):
            layer.params[name][...] += t * v
        loss = float(flow.bits_per_dim(x, 8).mean())
        for (layer, name), original in zip(params, originals):
            layer.params[name][...] = original
        return loss

    eps = 1e-6   # central differences in float64: error ~ eps² · L''' + 1e-16 / eps
    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)


def test_bits_per_dim_is_log_prob_in_bits():
    rng = np.random.default_rng(2)
    flow = small_flow("finc", "affine")
    x = images(rng)
    randomize(flow, x, rng)
    D = x[0].size
    expected = (-flow.log_prob(x) + D * 5 * math.log(2)) / (D * math.log(2))
    np.testing.assert_allclose(flow.bits_per_dim(x, 5), expected, rtol=1e-12)


def test_untrained_flow_on_uniform_noise_costs_about_n_bits():
    """At initialization the flow is close to a standard normal on the data: on uniform
    noise in [-0.5, 0.5) (density 1 · 2^(n_bits·D)), bpd is near n_bits plus the Gaussian's
    small mismatch, not wildly off (a sign error in a logdet would show here)."""
    rng = np.random.default_rng(3)
    flow = small_flow("cinc", "quad", dtype=np.float32)
    x = images(rng, 64).astype(np.float32)
    bpd = float(flow.bits_per_dim(x, 8).mean())
    assert 8.0 < bpd < 9.0, bpd


def test_sample_shapes_and_temperature():
    rng = np.random.default_rng(4)
    flow = small_flow("emerging", "affine", dtype=np.float32)
    x = images(rng).astype(np.float32)
    randomize(flow, x, rng)
    hot = flow.sample(16, temperature=1.0, rng=np.random.default_rng(5))
    cold = flow.sample(16, temperature=0.0, rng=np.random.default_rng(5))
    assert hot.shape == (16,) + SHAPE and hot.dtype == np.float32
    assert np.isfinite(hot).all()
    assert np.allclose(cold, cold[0])          # temperature 0: every sample is the mode path
    again = flow.sample(16, temperature=1.0, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(hot, again)


def test_splits_keep_half_and_decode_checks_latent_count():
    flow = small_flow("glow1x1", "affine")
    assert sum(isinstance(layer, Split) for layer in flow.layers) == 1
    with pytest.raises(ValueError, match="latents"):
        flow.decode([np.zeros((1,) + flow.top_shape)])


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="divisible by 8"):
        Flow((1, 12, 12), levels=3)
    with pytest.raises(ValueError, match="unknown invconv"):
        Flow((1, 8, 8), levels=2, invconv="dense")


def test_sampling_that_overflows_says_so(monkeypatch):
    flow = small_flow("glow1x1", "affine", dtype=np.float32)
    flow.forward(images(np.random.default_rng(0)).astype(np.float32))   # ActNorm initialized
    top_layer = flow.layers[-1]
    monkeypatch.setattr(top_layer, "inverse", lambda y: np.full_like(y, np.inf))
    with pytest.raises(ValueError, match="sampling diverged at temperature 1.0.*lower temperature"):
        flow.sample(4, temperature=1.0, rng=np.random.default_rng(0))


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("invconv", STEP_KINDS)
def test_memory_saving_mode_gives_the_same_gradients(invconv, coupling):
    """Rebuilding each layer's input with inverse instead of caching it changes the gradients
    only by the inverses' rounding, and no layer holds a cache afterwards."""
    rng = np.random.default_rng(6)
    flow = small_flow(invconv, coupling)
    x = images(rng)
    randomize(flow, x, rng)
    results = []
    for recompute in (False, True):
        for layer in flow.layers:
            layer.zero_grad()
        loss, _ = flow.loss_and_backward(x, 8, recompute=recompute)
        results.append((loss, {(i, name): g.copy() for i, layer in enumerate(flow.layers)
                               for name, g in layer.grads.items()}))
    (loss_cached, grads_cached), (loss_recomputed, grads_recomputed) = results
    assert loss_recomputed == loss_cached
    for key, grad in grads_cached.items():
        np.testing.assert_allclose(grads_recomputed[key], grad, rtol=1e-9, atol=1e-12, err_msg=str(key))
    assert all(getattr(layer, "_cache", None) is None for layer in flow.layers)


def caches_left(obj, name):
    """(path, type) of every layer, part or inner piece (a coupling network's ReLUs included)
    under ``obj`` that still holds a forward cache."""
    from nfcore.layers.base import Layer
    left = [(name, type(obj).__name__)] if getattr(obj, "_cache", None) is not None else []
    children = dict(getattr(obj, "parts", {}))
    children.update({key: value for key, value in vars(obj).items() if isinstance(value, Layer)})
    for key, child in children.items():
        left += caches_left(child, f"{name}.{key}")
    return left


@pytest.mark.parametrize("invconv", STEP_KINDS)
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_memory_saving_mode_releases_every_cache(invconv, coupling):
    flow = Flow((3, 8, 8), levels=2, steps=2, hidden=8, invconv=invconv, coupling=coupling,
                dtype=np.float64)
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (2, 3, 8, 8))
    flow.forward(x)                                         # ActNorm initialization
    flow.forward(x, keep_caches=False)
    assert [left for i, layer in enumerate(flow.layers) for left in caches_left(layer, str(i))] == []
    flow.loss_and_backward(x, 8, recompute=True)
    assert [left for i, layer in enumerate(flow.layers) for left in caches_left(layer, str(i))] == []


def peak_training_memory(steps, recompute):
    """Peak bytes NumPy allocates (tracemalloc) in one loss_and_backward of a 3×16×16 flow."""
    import tracemalloc
    flow = Flow((3, 16, 16), levels=2, steps=steps, hidden=16, invconv="finc", coupling="quad")
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (16, 3, 16, 16)).astype(np.float32)
    flow.forward(x, keep_caches=False)                      # ActNorm initialization
    for layer in flow.layers:
        layer.zero_grad()
    tracemalloc.start()
    try:
        flow.loss_and_backward(x, 8, recompute=recompute)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_saving_mode_peak_memory_does_not_grow_with_depth():
    """K = 16 steps per level may take at most 1.3 times the peak of K = 2 in memory-saving
    mode (the parameters and gradients exist before the count starts); keeping every cache
    costs several times more."""
    shallow, deep = peak_training_memory(2, True), peak_training_memory(16, True)
    assert deep <= 1.3 * shallow, (shallow, deep)
    assert peak_training_memory(16, False) > 3 * deep
