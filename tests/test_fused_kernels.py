"""The fused Numba passes (nfcore/nn/fused.py) against their NumPy references, kernel by kernel
and through the layers that use them (Network, Conv2dZero, the couplings), in float32 and
float64, at odd shapes and B = 1, 3, 64."""
import numba
import numpy as np
import pytest

from nfcore.layers import AffineCoupling, QuadCoupling
from nfcore.layers.coupling import affine_backward, affine_forward, affine_inverse
from nfcore.nn import Conv2dZero, Network, fused

DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}
ROWS = [(1, 5), (3, 7), (64 * 9, 13), (1000, 1)]


@pytest.fixture
def reference(monkeypatch):
    """A function that runs ``call`` once fused and once on the NumPy references."""
    def both(call):
        results = []
        for on in (True, False):
            monkeypatch.setattr(fused, "FUSED", on)
            results.append(call())
        return results
    return both


def close(a, b, dtype, scale=1.0):
    tol = TOL[dtype]
    np.testing.assert_allclose(a, b, rtol=tol["rtol"], atol=tol["atol"] * scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_exp_and_log1p_float32_against_float64(dtype):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-87, 88, 20000), rng.standard_normal(20000) * 1e-4,
                        [0.0, -0.0, 1e-30, 88.0, -87.0, 1.0, -1.0]]).astype(dtype)
    e, lg = np.empty_like(x), np.empty_like(x)
    fused.exp_log1p_numba(x, e, lg)
    x64 = x.astype(np.float64)
    rel = 2e-7 if dtype == np.float32 else 1e-15
    np.testing.assert_allclose(e, np.exp(x64), rtol=rel, atol=0)
    np.testing.assert_allclose(lg, np.log1p(np.abs(x64)), rtol=rel, atol=0)


def test_fast_exp_keeps_nan_and_clamps():
    x = np.array([np.nan, -200.0, 200.0], dtype=np.float32)
    e, lg = np.empty_like(x), np.empty_like(x)
    fused.exp_log1p_numba(x, e, lg)
    assert np.isnan(e[0]) and np.isnan(lg[0])
    assert 0 <= e[1] < 1e-37 and np.isfinite(e[2]) and e[2] > 1e38


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R, O", ROWS)
def test_bias_relu_and_its_backward(R, O, dtype):
    rng = np.random.default_rng(1)
    y = rng.standard_normal((R, O)).astype(dtype)
    bias = rng.standard_normal(O).astype(dtype)
    out = fused.bias_relu_numba(y.copy(), bias)
    np.testing.assert_array_equal(out, fused.bias_relu_numpy(y.copy(), bias))
    np.testing.assert_array_equal(fused.relu_numba(y.copy()), fused.bias_relu_numpy(y.copy(), None))
    dy = rng.standard_normal((R, O)).astype(dtype)
    dx, dbias = fused.relu_backward_bias_numba(dy.copy(), out)
    dx_ref, dbias_ref = fused.relu_backward_bias_numpy(dy, out)
    np.testing.assert_array_equal(dx, dx_ref)
    assert dbias.dtype == dtype
    close(dbias, dbias_ref, dtype, np.sqrt(R))


def test_bias_relu_keeps_nan_like_the_reference():
    y = np.array([[np.nan, -1.0, 2.0, -np.inf]], dtype=np.float32)
    out = fused.bias_relu_numba(y.copy(), np.zeros(4, np.float32))
    assert np.isnan(out[0, 0]) and out[0, 1:].tolist() == [0.0, 2.0, 0.0]
    with np.errstate(invalid="ignore"):                # -inf · 0 in the reference
        assert np.isnan(fused.bias_relu_numpy(y.copy(), None)[0, 0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R, O", ROWS)
def test_scale_bias_and_its_backward(R, O, dtype):
    rng = np.random.default_rng(2)
    g = rng.standard_normal((R, O)).astype(dtype)
    bias, e = rng.standard_normal(O).astype(dtype), np.exp(rng.standard_normal(O)).astype(dtype)
    u, y = fused.scale_bias_numba(g.copy(), bias, e)
    u_ref, y_ref = fused.scale_bias_numpy(g.copy(), bias, e)
    np.testing.assert_array_equal(u, u_ref)
    np.testing.assert_array_equal(y, y_ref)
    dy = rng.standard_normal((R, O)).astype(dtype)
    for got, want in zip(fused.scale_bias_backward_numba(dy, u, e),
                         fused.scale_bias_backward_numpy(dy, u, e)):
        assert got.dtype == dtype
        close(got, want, dtype, np.sqrt(R))


def test_fused_reductions_do_not_depend_on_the_thread_count():
    rng = np.random.default_rng(3)
    dy = rng.standard_normal((4099, 9)).astype(np.float32)
    u = rng.standard_normal((4099, 9)).astype(np.float32)
    e = np.ones(9, np.float32)
    before = numba.get_num_threads()
    results = []
    try:
        for n in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(n)
            results.append(fused.scale_bias_backward_numba(dy, u, e)[1:]
                           + fused.relu_backward_bias_numba(dy.copy(), u)[1:])
    finally:
        numba.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def affine_inputs(B, C, H, W, lo, dtype, seed=4):
    """x (B, C, H, W), h channel-last (B, H, W, 2·Cb) with raw values over a wide range (s
    from ~e^-12 to ~1), and the block lo..C."""
    rng = np.random.default_rng(seed)
    Cb = C - lo
    x = rng.standard_normal((B, C, H, W)).astype(dtype)
    h = np.concatenate([rng.standard_normal((B, H, W, Cb)),
                        rng.uniform(-12, 8, (B, H, W, Cb))], axis=3).astype(dtype)
    return x, h


SHAPES = [(1, 3, 5, 7, 1), (3, 5, 4, 3, 2), (64, 6, 4, 4, 3), (3, 13, 1, 1, 6)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bound", [None, 3.0, 0.1])
@pytest.mark.parametrize("B, C, H, W, lo", SHAPES)
def test_affine_kernels_match_the_references(B, C, H, W, lo, bound, dtype):
    x, h = affine_inputs(B, C, H, W, lo, dtype)
    Cb, HW = C - lo, H * W
    h_first = np.ascontiguousarray(h.transpose(0, 3, 1, 2))
    c = fused.scale_constants(dtype, bound)
    y = np.full_like(x, 7.0)
    shifted, s, slope = (np.empty((B, Cb, H, W), dtype) for _ in range(3))
    flat = (B, Cb, HW)
    logdet = fused.affine_forward_numba(x.reshape(B, C, HW), lo, h.reshape(B, HW, 2 * Cb), c,
                                        y.reshape(B, C, HW), shifted.reshape(flat),
                                        s.reshape(flat), slope.reshape(flat))
    y_ref, logdet_ref, (shifted_ref, s_ref, slope_ref) = affine_forward(x[:, lo:], h_first, bound)
    assert (y[:, :lo] == 7.0).all()                   # only the block is written
    close(y[:, lo:], y_ref, dtype)
    close(shifted, shifted_ref, dtype)
    close(s, s_ref, dtype)
    if bound is not None:
        close(slope, slope_ref, dtype)
    close(logdet, logdet_ref, dtype, 10 * Cb * HW)

    back = np.full_like(x, 7.0)
    fused.affine_inverse_numba(y.reshape(B, C, HW), lo, h.reshape(B, HW, 2 * Cb), c,
                               back.reshape(B, C, HW))
    assert (back[:, :lo] == 7.0).all()
    np.testing.assert_allclose(back[:, lo:], affine_inverse(y[:, lo:], h_first, bound),
                               rtol=TOL[dtype]["rtol"] * 10, atol=TOL[dtype]["atol"] * 10)
    close(back[:, lo:], x[:, lo:], dtype, 1e3 if dtype == np.float32 else 1e2)

    rng = np.random.default_rng(5)
    dy = rng.standard_normal(x.shape).astype(dtype)
    dlogdet = rng.standard_normal(B).astype(dtype)
    dx = np.full_like(x, 7.0)
    dh = fused.affine_backward_numba(dy.reshape(B, C, HW), lo, dlogdet, shifted.reshape(flat),
                                     s.reshape(flat), (s if bound is None else slope).reshape(flat),
                                     bound is not None, c, dx.reshape(B, C, HW))
    cache = (shifted_ref, s_ref, None if bound is None else slope_ref)
    dx_ref, dh_ref = affine_backward(dy[:, lo:], dlogdet, cache)
    assert (dx[:, :lo] == 7.0).all()
    close(dx[:, lo:], dx_ref, dtype)
    close(dh.reshape(B, H, W, 2 * Cb), dh_ref.transpose(0, 2, 3, 1), dtype, 10)


def perturbed(layer, x, seed):
    """The layer built on x, every parameter random (the zero-initialized convs too)."""
    layer.forward(x)
    rng = np.random.default_rng(seed)
    for name, param in layer.params.items():
        param[...] = rng.standard_normal(param.shape) * (0.1 if name.endswith("logs") else 0.3)
    return layer


def run_layer(layer, x, dy, *extra):
    layer.zero_grad()
    out = layer.forward(x)
    y = out[0] if isinstance(out, tuple) else out
    dx = layer.backward(dy, *extra)
    grads = {name: grad.copy() for name, grad in layer.grads.items()}
    return out, dx, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("actnorm", [False, True], ids=["plain", "actnorm"])
@pytest.mark.parametrize("B", [1, 3, 64])
def test_network_fused_matches_reference(B, actnorm, dtype, reference):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((B, 3, 5, 7)).astype(dtype)
    net = perturbed(Network(4, hidden=9, actnorm=actnorm, dtype=dtype, seed=2), x, 7)
    dy = rng.standard_normal((B, 4, 5, 7)).astype(dtype)
    (h, dx, grads), (h_ref, dx_ref, grads_ref) = reference(lambda: run_layer(net, x, dy))
    close(h, h_ref, dtype, 10)
    close(dx, dx_ref, dtype, 10)
    assert set(grads) == set(grads_ref)
    for name in grads:
        close(grads[name], grads_ref[name], dtype, 10 * B)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2dzero_fused_matches_reference(dtype, reference):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 5, 4, 7)).astype(dtype)
    conv = perturbed(Conv2dZero(5, 3, dtype=dtype), x, 9)
    dy = rng.standard_normal((3, 5, 4, 5)).astype(dtype)
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = reference(lambda: run_layer(conv, x, dy))
    close(y, y_ref, dtype)
    close(dx, dx_ref, dtype, 10)
    for name in grads:
        close(grads[name], grads_ref[name], dtype, 100)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bound", [None, 2.0])
@pytest.mark.parametrize("kind, C", [(AffineCoupling, 5), (QuadCoupling, 6), (AffineCoupling, 2)])
@pytest.mark.parametrize("B", [1, 3, 64])
def test_coupling_fused_matches_reference(B, kind, C, bound, dtype, reference):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((B, C, 3, 5)).astype(dtype)
    layer = perturbed(kind(hidden=6, dtype=dtype, seed=1, scale_bound=bound), x, 11)
    dy = rng.standard_normal(x.shape).astype(dtype)
    dlogdet = rng.standard_normal(B).astype(dtype)
    (out, dx, grads), (out_ref, dx_ref, grads_ref) = reference(
        lambda: run_layer(layer, x, dy, dlogdet))
    close(out[0], out_ref[0], dtype, 10)
    assert out[1].dtype == dtype
    close(out[1], out_ref[1], dtype, 100)
    close(dx, dx_ref, dtype, 10)
    for name in grads:
        close(grads[name], grads_ref[name], dtype, 100 * B)
    inverses = reference(lambda: layer.inverse(out_ref[0]))
    close(inverses[0], inverses[1], dtype, 10)
    close(inverses[0], x, dtype, 100)


def test_fused_coupling_backward_follows_a_reference_forward(monkeypatch):
    """The caches are the same tuples: either backward can follow either forward."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((3, 5, 4, 4))
    layer = perturbed(AffineCoupling(hidden=6, seed=1, scale_bound=1.5), x, 13)
    dy, dlogdet = rng.standard_normal(x.shape), rng.standard_normal(3)
    monkeypatch.setattr(fused, "FUSED", False)
    layer.forward(x)
    monkeypatch.setattr(fused, "FUSED", True)
    dx = layer.backward(dy, dlogdet)
    monkeypatch.setattr(fused, "FUSED", False)
    layer.forward(x)
    np.testing.assert_allclose(dx, layer.backward(dy, dlogdet), rtol=1e-12, atol=1e-13)
