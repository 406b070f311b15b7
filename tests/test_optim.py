"""Adam against an independent reference, warm-up, clipping, EMA and the state round trip."""
import numpy as np
import pytest

from nfcore.optim import Adam


class Toy:
    """A stand-in layer: params and grads dicts, nothing else."""

    def __init__(self, rng, shapes):
        self.params = {name: rng.standard_normal(shape) for name, shape in shapes.items()}
        self.grads = {name: np.zeros(shape) for name, shape in shapes.items()}


def make_layers(seed=0):
    rng = np.random.default_rng(seed)
    return [Toy(rng, {"weight": (3, 4), "bias": (3,)}), Toy(rng, {}), Toy(rng, {"scale": (2,)})]


def fill_grads(layers, rng):
    for layer in layers:
        for name, grad in layer.grads.items():
            grad[...] = rng.standard_normal(grad.shape)


def reference_adam(theta, grads, lr, beta1, beta2, eps):
    """Textbook Adam on one flat vector, for a list of gradients."""
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g ** 2
        theta = theta - lr * (m / (1 - beta1 ** t)) / (np.sqrt(v / (1 - beta2 ** t)) + eps)
    return theta


def flatten(layers, which="params"):
    return np.concatenate([getattr(l, which)[n].ravel() for l in layers for n in l.params])


def test_adam_matches_reference():
    layers = make_layers()
    theta0 = flatten(layers)
    opt = Adam(layers, lr=0.01, betas=(0.8, 0.99), eps=1e-6)
    rng = np.random.default_rng(1)
    grads = []
    for _ in range(5):
        fill_grads(layers, rng)
        grads.append(flatten(layers, "grads"))
        opt.step()
    expected = reference_adam(theta0, grads, 0.01, 0.8, 0.99, 1e-6)
    np.testing.assert_allclose(flatten(layers), expected, rtol=1e-12, atol=1e-12)


def test_first_step_moves_each_entry_by_lr():
    layers = make_layers()
    before = flatten(layers)
    fill_grads(layers, np.random.default_rng(2))
    layers[0].grads["bias"][1] = 0.0
    sign = np.sign(flatten(layers, "grads"))
    Adam(layers, lr=0.1, eps=1e-12).step()        # Δ = −lr · g / (|g| + eps)
    delta = flatten(layers) - before
    np.testing.assert_allclose(delta, -0.1 * sign, atol=1e-9)    # zero gradient: no move


def test_updates_are_in_place_and_zero_grad():
    layers = make_layers()
    weight, grad = layers[0].params["weight"], layers[0].grads["weight"]
    opt = Adam(layers)
    fill_grads(layers, np.random.default_rng(3))
    opt.step()
    opt.zero_grad()
    assert layers[0].params["weight"] is weight and layers[0].grads["weight"] is grad
    assert all(not g.any() for l in layers for g in l.grads.values())


def test_warmup_is_linear():
    opt = Adam(make_layers(), lr=1.0, warmup_steps=4)
    assert [opt.learning_rate(t) for t in (1, 2, 4, 5, 100)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    layers = make_layers()
    before = flatten(layers)
    opt = Adam(layers, lr=0.1, warmup_steps=4, eps=1e-12)
    fill_grads(layers, np.random.default_rng(4))
    opt.step()                                    # first step: |Δ| = lr / 4
    np.testing.assert_allclose(np.abs(flatten(layers) - before), 0.025, atol=1e-9)
    assert Adam(make_layers(), lr=0.3).learning_rate(1) == 0.3


def test_clipping_returns_the_pre_clip_norm_and_scales_gradients():
    layers = make_layers()
    fill_grads(layers, np.random.default_rng(5))
    grads = flatten(layers, "grads")
    norm = np.linalg.norm(grads)
    theta0 = flatten(layers)
    clipped = Adam(layers, lr=0.01, max_grad_norm=norm / 10)
    assert clipped.step() == pytest.approx(norm, rel=1e-12)
    # Adam's first step is scale-free; compare two steps, the second with a new gradient
    second = np.random.default_rng(6)
    fill_grads(layers, second)
    g2 = flatten(layers, "grads")
    norm2 = clipped.step()
    assert norm2 == pytest.approx(np.linalg.norm(g2), rel=1e-12)
    scale1, scale2 = min(1, (norm / 10) / norm), min(1, (norm / 10) / norm2)
    expected = reference_adam(theta0, [grads * scale1, g2 * scale2], 0.01, 0.9, 0.999, 1e-8)
    np.testing.assert_allclose(flatten(layers), expected, rtol=1e-12, atol=1e-12)
    # a norm below the threshold is left alone
    layers = make_layers()
    fill_grads(layers, np.random.default_rng(5))
    assert Adam(layers, max_grad_norm=10 * norm).step() == pytest.approx(norm)


def test_nonfinite_gradient_raises_without_update():
    layers = make_layers()
    fill_grads(layers, np.random.default_rng(7))
    layers[2].grads["scale"][0] = np.nan
    before = flatten(layers)
    opt = Adam(layers)
    with pytest.raises(FloatingPointError, match="nan"):
        opt.step()
    np.testing.assert_array_equal(flatten(layers), before)
    assert opt.step_count == 0


def test_bad_gradient_shape_names_the_layer():
    layers = make_layers()
    layers[2].grads["scale"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"layer 2 \(Toy\): grads\['scale'\]"):
        Adam(layers).step()
    with pytest.raises(TypeError, match="layer 0"):
        Adam([object()])


def test_ema_average_and_swap():
    layers = make_layers()
    opt = Adam(layers, lr=0.1, ema_decay=0.5)
    rng = np.random.default_rng(8)
    history = []
    for _ in range(3):
        fill_grads(layers, rng)
        opt.step()
        history.append(flatten(layers))
    expected = 0.5 * (0.5 * history[0] + 0.5 * history[1]) + 0.5 * history[2]
    current = flatten(layers)
    with opt.ema_parameters():
        np.testing.assert_allclose(flatten(layers), expected, rtol=1e-12)
    np.testing.assert_array_equal(flatten(layers), current)
    with pytest.raises(ValueError, match="ema_decay"):
        Adam(make_layers()).swap_ema()


def run(layers, opt, rng, steps):
    for _ in range(steps):
        fill_grads(layers, rng)
        opt.step()


def test_state_round_trip_continues_identically():
    settings = dict(lr=0.01, warmup_steps=3, max_grad_norm=1.0, ema_decay=0.9)
    layers = make_layers()
    opt = Adam(layers, **settings)
    rng = np.random.default_rng(9)
    run(layers, opt, rng, 6)

    resumed_layers = make_layers()
    first = Adam(resumed_layers, **settings)
    rng = np.random.default_rng(9)
    run(resumed_layers, first, rng, 4)
    state = first.state_dict()
    assert state["step"] == 4 and isinstance(state["step"], int)
    assert set(state) >= {"m/0/weight", "v/2/scale", "ema/0/bias"}

    fresh_layers = make_layers(seed=123)           # different values, restored below
    for layer, source in zip(fresh_layers, resumed_layers):
        for name in layer.params:
            layer.params[name][...] = source.params[name]
    second = Adam(fresh_layers, **settings)
    second.load_state_dict(state)
    run(fresh_layers, second, rng, 2)
    np.testing.assert_array_equal(flatten(fresh_layers), flatten(layers))
    with opt.ema_parameters(), second.ema_parameters():
        np.testing.assert_array_equal(flatten(fresh_layers), flatten(layers))


def test_load_state_dict_errors():
    layers = make_layers()
    opt = Adam(layers)
    state = opt.state_dict()
    del state["v/0/bias"]
    with pytest.raises(ValueError, match="v/0/bias"):
        Adam(make_layers()).load_state_dict(state)
    state = opt.state_dict()
    state["m/0/weight"] = np.zeros((4, 3))
    with pytest.raises(ValueError, match="m/0/weight.*shape"):
        Adam(make_layers()).load_state_dict(state)
    state = opt.state_dict()
    state["m/9/extra"] = np.zeros(1)
    with pytest.raises(ValueError, match="m/9/extra"):
        Adam(make_layers()).load_state_dict(state)


def test_float32_parameters_stay_float32():
    layers = make_layers()
    for layer in layers:
        for name in layer.params:
            layer.params[name] = layer.params[name].astype(np.float32)
            layer.grads[name] = layer.grads[name].astype(np.float32)
    theta0 = flatten(layers).astype(np.float64)
    opt = Adam(layers, lr=0.01)
    fill_grads(layers, np.random.default_rng(10))
    g = flatten(layers, "grads").astype(np.float64)
    opt.step()
    assert all(p.dtype == np.float32 for l in layers for p in l.params.values())
    assert all(m.dtype == np.float32 for m in opt.m.values())
    expected = reference_adam(theta0, [g], 0.01, 0.9, 0.999, 1e-8)
    np.testing.assert_allclose(flatten(layers), expected, rtol=1e-5, atol=1e-6)


def test_layers_whose_parameters_are_built_on_first_use():
    """Adam([InvConv(k=3)]) before the layer has weights: its moments are made at the first
    step. Adam's first step moves every entry with a nonzero gradient by lr (bias-corrected
    m/sqrt(v) = sign(g)), and state_dict / load_state_dict carry them."""
    import nfcore
    conv = nfcore.InvConv(k=3)
    optimizer = Adam([conv], lr=0.01, eps=1e-12, ema_decay=0.5)
    assert conv.params == {}
    x = np.random.default_rng(0).standard_normal((2, 4, 5, 5))
    y, logdet = conv.forward(x)
    optimizer.zero_grad()
    conv.backward(np.ones_like(y), np.ones_like(logdet))
    before = conv.params["weight"].copy()
    grad = conv.grads["weight"].copy()
    optimizer.step()
    moved = before - conv.params["weight"]
    np.testing.assert_allclose(moved[grad != 0], 0.01 * np.sign(grad[grad != 0]), rtol=1e-6)
    np.testing.assert_array_equal(moved[grad == 0], 0.0)
    state = optimizer.state_dict()
    assert {"m/0/weight", "v/0/weight", "ema/0/weight"} <= set(state)
    again = Adam([conv], lr=0.01, ema_decay=0.5)
    again.load_state_dict(state)
    np.testing.assert_array_equal(again.m["0/weight"], optimizer.m["0/weight"])


def test_the_fused_update_is_its_numpy_reference():
    """adam_update_numba (one pass, the NumPy parameters' path) gives exactly what the
    whole-array adam_update_numpy gives in float64; in float32 it rounds once per stored value
    from float64 arithmetic, so it agrees with the float64 reference to float32 rounding."""
    from nfcore.optim import adam_update_numba, adam_update_numpy
    rng = np.random.default_rng(11)
    settings = (0.7, 1e-3, 0.9, 0.999, 1 - 0.9 ** 3, 1 - 0.999 ** 3, 1e-8)
    param, grad = rng.standard_normal((2, 300))
    m = rng.standard_normal(300) * 0.1
    v = rng.random(300) * 0.01
    for dtype in (np.float64, np.float32):
        arrays = [a.astype(dtype) for a in (param, grad, m, v)]
        expected = [a.astype(np.float64) for a in arrays]     # the same (rounded) inputs
        adam_update_numba(*arrays, *settings)
        adam_update_numpy(np, *expected, *settings)
        for got, want in zip(arrays, expected):
            if dtype == np.float64:
                np.testing.assert_array_equal(got, want)
            else:
                rounding = 4 * np.finfo(np.float32).eps * (np.abs(want) + 1e-3)
                assert np.all(np.abs(got - want) <= rounding)
        assert not np.array_equal(arrays[0], param.astype(dtype))          # it moved
