"""InvConv and FInCUnit against independent references.

- log-det against slogdet of the dense matrix written from the convolution's definition
  (nfcore.reference.masked_conv_matrix, which shares no code with the kernels);
- inverse against a dense LU solve of that matrix, and inverse(forward(x)) == x;
- backward against float64 central finite differences, along random directions (as Chainer's
  check_backward) and entry by entry on tiny shapes;
- the Numba kernels against their plain NumPy references;
- clear errors for bad input.
"""
import itertools
import zlib

import numpy as np
import pytest

import nfcore
from nfcore import reference
from nfcore.kernels import CanonicalLayout, cpu as cpu_module, from_layout, numpy_ref, to_layout
from nfcore.layers.invconv import GroupedMaskedConv


def random_params(layer, rng, scale=0.3):
    """Fill every parameter with random values, masked entries included: any values must give
    a valid layer. Off-self weights ~ N(0, scale² / (k²·Cg)) keep the solve well conditioned."""
    weight = layer.params["weight"]
    Cg, k = weight.shape[-3], weight.shape[-1]
    weight[...] = rng.standard_normal(weight.shape) * scale / np.sqrt(k * k * Cg)
    if "log_diag" in layer.params:
        layer.params["log_diag"][...] = rng.standard_normal(layer.params["log_diag"].shape) * 0.2
    if "bias" in layer.params:
        layer.params["bias"][...] = rng.standard_normal(layer.params["bias"].shape)


def make_layer(kind, k, C, learn_diag, corner="top-left", dtype=np.float64, seed=0):
    """kind: "invconv" (lower self-tap), "upper" (an InvConv with an upper self-tap and a bias,
    the published CInC form at any corner), "finc" (four quarters, lower), "grouped-upper" (four
    quarters, each with an upper self-tap and a bias)."""
    if kind == "finc":
        return nfcore.FInCUnit(k=k, channels=C, learn_diag=learn_diag, dtype=dtype, seed=seed)
    if kind == "grouped-upper":
        return GroupedMaskedConv(k, nfcore.CORNERS, C, learn_diag, dtype, seed, self_tap="upper",
                                 bias=True)
    if kind == "upper":
        return nfcore.InvConv(k=k, channels=C, corner=corner, learn_diag=learn_diag, dtype=dtype,
                              seed=seed, self_tap="upper", bias=True)
    return nfcore.InvConv(k=k, channels=C, corner=corner, learn_diag=learn_diag, dtype=dtype, seed=seed)


CASES = [(kind, k, C, learn_diag, corner)
         for kind, k, C, learn_diag, corner in itertools.product(
             ["invconv", "upper"], [1, 2, 3, 5], [1, 2, 3, 8], [False, True], nfcore.CORNERS)]
CASES += [(kind, k, C, learn_diag, "all")
          for kind, k, C, learn_diag in itertools.product(
              ["finc", "grouped-upper"], [1, 2, 3, 5], [4, 8], [False, True])]
SINGLE_KINDS = [("invconv", c) for c in nfcore.CORNERS] + [("upper", c) for c in nfcore.CORNERS]
GROUPED_KINDS = [("finc", "all"), ("grouped-upper", "all")]
H, W = 4, 5   # H ≠ W on purpose


def case_id(case):
    kind, k, C, learn_diag, corner = case
    return f"{kind}-k{k}-C{C}-{'diag' if learn_diag else 'unit'}-{corner}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_logdet_and_inverse_match_dense_scipy(case):
    kind, k, C, learn_diag, corner = case
    rng = np.random.default_rng(zlib.crc32(case_id(case).encode()))
    layer = make_layer(kind, k, C, learn_diag, corner)
    random_params(layer, rng)
    x = rng.standard_normal((2, C, H, W))

    y, logdet = layer.forward(x)
    M = reference.masked_conv_matrix(layer, H, W)
    sign, dense_logdet = reference.slogdet(M)
    assert sign[0] == 1
    assert logdet.shape == (2,)
    np.testing.assert_allclose(logdet, dense_logdet[0], rtol=1e-10, atol=1e-10)
    # the forward pass is the dense matrix product, plus the bias (the image of zero)
    offset = layer.forward(np.zeros((1, C, H, W)))[0].reshape(1, -1)
    assert np.any(offset != 0) == ("bias" in layer.params)
    np.testing.assert_allclose(y.reshape(2, -1), x.reshape(2, -1) @ M.T + offset, rtol=0, atol=1e-12)

    x_dense = reference.dense_inverse(layer, y)
    x_ours = layer.inverse(y)
    assert np.abs(x_ours - x_dense).max() <= 1e-12 * np.abs(x_dense).max()
    assert np.abs(x_ours - x).max() <= 1e-12 * np.abs(x).max()


@pytest.mark.parametrize("kind,corner", SINGLE_KINDS + GROUPED_KINDS)
@pytest.mark.parametrize("learn_diag", [False, True])
def test_float32_inverse_matches_dense_solve(kind, corner, learn_diag):
    rng = np.random.default_rng(1)
    layer = make_layer(kind, 3, 8, learn_diag, corner, dtype=np.float32)
    random_params(layer, rng)
    y = rng.standard_normal((3, 8, 6, 7)).astype(np.float32)
    x = layer.inverse(y)
    assert x.dtype == np.float32
    x_dense = reference.dense_inverse(layer, y)      # float64 solve of the float32 weights
    assert np.abs(x - x_dense).max() <= 1e-5 * np.abs(x_dense).max()
    y_back, _ = layer.forward(x)
    assert np.abs(y_back - y).max() <= 1e-5 * np.abs(y).max()


def test_check_reports_small_errors():
    layer = nfcore.FInCUnit(k=3, channels=8, learn_diag=True, dtype=np.float64)
    random_params(layer, np.random.default_rng(2))
    errors = reference.check(layer, np.random.default_rng(3).standard_normal((2, 8, 5, 4)))
    assert set(errors) == {"logdet", "inverse", "dense_solve"}
    assert max(errors.values()) < 1e-12


def test_masked_entries_do_not_matter():
    """Values written into masked entries (upper self-tap, its diagonal) change nothing."""
    rng = np.random.default_rng(4)
    layer = nfcore.InvConv(k=3, channels=5, learn_diag=True, dtype=np.float64)
    random_params(layer, rng)
    x = rng.standard_normal((2, 5, 4, 6))
    y, logdet = layer.forward(x)
    upper_and_diag = np.triu(np.ones((5, 5))) > 0
    layer.params["weight"][:, :, 2, 2][upper_and_diag] = rng.standard_normal(15) * 100
    y2, logdet2 = layer.forward(x)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(logdet, logdet2)


# ---- backward against finite differences ------------------------------------------------

def loss_and_backward(layer, x, g, h):
    """L = Σ y·g + Σ logdet·h, and its gradients from the hand-written backward."""
    layer.zero_grad()
    y, logdet = layer.forward(x)
    dx = layer.backward(g, h)
    return float(np.sum(y * g) + np.sum(logdet * h)), dx, {n: v.copy() for n, v in layer.grads.items()}


def loss_only(layer, x, g, h):
    y, logdet = layer.forward(x)
    return float(np.sum(y * g) + np.sum(logdet * h))


@pytest.mark.parametrize("kind,corner", SINGLE_KINDS + GROUPED_KINDS)
@pytest.mark.parametrize("learn_diag", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_backward_matches_directional_finite_differences(kind, corner, learn_diag, k):
    rng = np.random.default_rng(5)
    layer = make_layer(kind, k, 4, learn_diag, corner)
    random_params(layer, rng, scale=1.0)
    x = rng.standard_normal((2, 4, 5, 3))
    g, h = rng.standard_normal((2, 4, 5, 3)), rng.standard_normal(2)
    _, dx, grads = loss_and_backward(layer, x, g, h)
    eps = 1e-6   # central differences: truncation O(eps²) ~ 1e-12, rounding ~ 1e-16/eps ~ 1e-10

    v = rng.standard_normal(x.shape)
    numeric = (loss_only(layer, x + eps * v, g, h) - loss_only(layer, x - eps * v, g, h)) / (2 * eps)
    np.testing.assert_allclose(np.sum(dx * v), numeric, rtol=1e-7, atol=1e-8)

    for name, param in layer.params.items():
        v = rng.standard_normal(param.shape)
        original = param.copy()
        param[...] = original + eps * v
        plus = loss_only(layer, x, g, h)
        param[...] = original - eps * v
        minus = loss_only(layer, x, g, h)
        param[...] = original
        np.testing.assert_allclose(np.sum(grads[name] * v), (plus - minus) / (2 * eps),
                                   rtol=1e-7, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("kind,corner", SINGLE_KINDS)
def test_backward_matches_finite_differences_entry_by_entry(kind, corner):
    rng = np.random.default_rng(6)
    layer = make_layer(kind, 2, 2, True, corner)
    random_params(layer, rng, scale=1.0)
    x = rng.standard_normal((2, 2, 3, 2))
    g, h = rng.standard_normal(x.shape), rng.standard_normal(2)
    _, dx, grads = loss_and_backward(layer, x, g, h)
    eps = 1e-6

    def numeric_gradient(array):
        out = np.zeros_like(array)
        for index in np.ndindex(array.shape):
            original = array[index]
            array[index] = original + eps
            plus = loss_only(layer, x, g, h)
            array[index] = original - eps
            minus = loss_only(layer, x, g, h)
            array[index] = original
            out[index] = (plus - minus) / (2 * eps)
        return out

    np.testing.assert_allclose(dx, numeric_gradient(x), rtol=1e-7, atol=1e-8)
    for name, param in layer.params.items():
        np.testing.assert_allclose(grads[name], numeric_gradient(param), rtol=1e-7, atol=1e-8,
                                   err_msg=name)


@pytest.mark.parametrize("kind", ["invconv", "finc", "upper", "grouped-upper"])
def test_masked_entries_get_exactly_zero_gradient(kind):
    rng = np.random.default_rng(7)
    layer = make_layer(kind, 3, 8, True)
    random_params(layer, rng)
    x = rng.standard_normal((2, 8, 4, 5))
    layer.forward(x)
    layer.backward(rng.standard_normal(x.shape), rng.standard_normal(2))
    dself = layer.grads["weight"][..., 2, 2]                # (..., Cg, Cg) self-tap block [co, ci]
    ones = np.ones(dself.shape[-2:])
    masked = (np.triu(ones) if "upper" not in kind else np.tril(ones)) > 0   # and the diagonal
    assert np.all(dself[..., masked] == 0)
    assert np.all(dself[..., ~masked] != 0)


def test_backward_accumulates():
    rng = np.random.default_rng(8)
    layer = nfcore.InvConv(k=3, channels=3, learn_diag=True, dtype=np.float64)
    x, dy, dlogdet = rng.standard_normal((2, 3, 4, 4)), rng.standard_normal((2, 3, 4, 4)), np.ones(2)
    layer.forward(x)
    layer.backward(dy, dlogdet)
    once = {n: g.copy() for n, g in layer.grads.items()}
    layer.backward(dy, dlogdet)
    for name in once:
        np.testing.assert_allclose(layer.grads[name], 2 * once[name])


# ---- the kernels against their NumPy references -------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4, 3), (1, 37, 4, 5, 6), (1, 5, 3, 4, 7)], ids=str)
def test_cpu_kernels_match_numpy_references(dtype, tol, k, shape):
    """Output channels in every grouping the kernels use: C = 3 (one block of three), C = 6 (a
    block of four, then two one at a time), C = 7 (four, then three); and B = 37, unpadded here
    (rows of 8 SIMD lanes and 5 left over; the weight gradient's LANE_CHUNK = 32: two chunks of
    images, the last of 5)."""
    cpu = CanonicalLayout(cpu_module)           # batch-last inside, compared in (G, B, H, W, C)
    rng = np.random.default_rng(9)
    G, B, Hk, Wk, C = shape
    x = rng.standard_normal((G, B, Hk, Wk, C)).astype(dtype)
    dy = rng.standard_normal((G, B, Hk, Wk, C)).astype(dtype)
    w = (rng.standard_normal((G, k, k, C, C)) * 0.2).astype(dtype)
    w[:, k - 1, k - 1] = np.triu(w[:, k - 1, k - 1]) + np.eye(C, dtype=dtype)   # L = w[..].T lower

    def close(a, b):
        assert a.dtype == dtype
        assert np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max())

    y = cpu.conv_forward(x, w)
    close(y, numpy_ref.conv_forward(x, w))
    close(cpu.conv_input_grad(dy, w), numpy_ref.conv_input_grad(dy, w))
    close(cpu.conv_weight_grad(x, dy, k), numpy_ref.conv_weight_grad(x, dy, k))
    for solve in (cpu.wavefront_inverse, cpu.raster_inverse,
                  numpy_ref.wavefront_inverse, numpy_ref.raster_inverse):
        close(solve(y, w), x)
    for solve in (cpu_module.sweep_inverse, cpu_module.diagonal_inverse):   # both schedules
        close(from_layout(solve(to_layout(y, cpu.module.AXES), w), cpu.module.AXES), x)


@pytest.mark.parametrize("kind", ["invconv", "finc", "grouped-upper"])
@pytest.mark.parametrize("B", [9, 66])
def test_padded_batch_gives_every_image_its_own_result(kind, B):
    """The CPU layout pads the batch to a multiple of cpu.LANES with zero images: each image's
    forward, inverse and input gradient are then exactly what it gets alone (B = 1, unpadded;
    the same operations in the same order per image), and the weight gradient is the sum of
    the images' own."""
    rng = np.random.default_rng(12)
    layer = make_layer(kind, 3, 8, learn_diag=True)
    for name, p in layer.params.items():
        p += 0.1 * rng.standard_normal(p.shape)
    x = rng.standard_normal((B, 8, 5, 6))
    dy = rng.standard_normal((B, 8, 5, 6))
    padded = cpu_module.to_groups(x, layer._flips())
    assert padded.shape[-1] == cpu_module.padded_batch(B) == -(-B // 8) * 8
    assert not padded[..., B:].any()
    np.testing.assert_array_equal(cpu_module.from_groups(padded, layer._flips(), B), x)

    y, _ = layer.forward(x)
    layer.zero_grad()
    dx = layer.backward(dy, np.zeros(B))
    dweight = {name: g.copy() for name, g in layer.grads.items()}
    alone = {name: np.zeros_like(g) for name, g in layer.grads.items()}
    for n in range(B):
        y_n, _ = layer.forward(x[n:n + 1])
        np.testing.assert_array_equal(y_n, y[n:n + 1])
        np.testing.assert_array_equal(layer.inverse(y_n), layer.inverse(y)[n:n + 1])
        layer.zero_grad()
        np.testing.assert_array_equal(layer.backward(dy[n:n + 1], np.zeros(1)), dx[n:n + 1])
        for name in alone:
            alone[name] += layer.grads[name]
    for name in alone:
        np.testing.assert_allclose(dweight[name], alone[name], rtol=1e-12, atol=1e-12)


# ---- construction, dtypes and bad input ---------------------------------------------------

def test_inverse_works_on_its_own_and_is_reproducible():
    y = np.random.default_rng(10).standard_normal((2, 3, 8, 8))
    x1 = nfcore.InvConv(k=3).inverse(y)
    x2 = nfcore.InvConv(k=3).inverse(y)
    np.testing.assert_array_equal(x1, x2)
    assert not np.allclose(nfcore.InvConv(k=3, seed=1).inverse(y), x1)


def test_parameter_count():
    C, k = 6, 3
    layer = nfcore.InvConv(k=k, channels=C)          # the mask the layer applies, one group
    assert layer.params["weight"].shape == (C, C, k, k)
    assert layer._mask.sum() == (k * k - 1) * C * C + C * (C - 1) // 2


def test_float32_input_with_float64_weights():
    layer = nfcore.InvConv(k=3, channels=4, dtype=np.float64)
    x = np.random.default_rng(11).standard_normal((2, 4, 5, 5)).astype(np.float32)
    y, logdet = layer.forward(x)
    assert y.dtype == np.float32 and logdet.dtype == np.float32
    dx = layer.backward(np.ones_like(y), np.zeros(2, np.float32))
    assert dx.dtype == np.float32 and layer.grads["weight"].dtype == np.float64


def test_finc_needs_channels_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        nfcore.FInCUnit(k=3).forward(np.zeros((1, 6, 4, 4)))


@pytest.mark.parametrize("bad,error,message", [
    (np.zeros((3, 4, 4)), ValueError, "4 dimensions"),
    (np.zeros((1, 5, 4, 4)), ValueError, "5 channels but the layer was built for 4"),
    (np.zeros((1, 4, 4, 4), dtype=np.int64), TypeError, "float32 or float64"),
    (np.full((1, 4, 4, 4), np.nan), ValueError, "NaN or Inf"),
    (np.full((1, 4, 4, 4), np.inf), ValueError, "NaN or Inf"),
    (np.zeros((1, 4, 0, 4)), ValueError, "empty dimension"),
    ([[[[0.0]]]], TypeError, "array"),
])
@pytest.mark.parametrize("method", ["forward", "inverse"])
def test_bad_input_raises_clear_errors(bad, error, message, method):
    layer = nfcore.InvConv(k=3, channels=4)
    with pytest.raises(error, match=message):
        getattr(layer, method)(bad)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="kernel size"):
        nfcore.InvConv(k=0)
    with pytest.raises(ValueError, match="unknown corner"):
        nfcore.InvConv(k=3, corner="middle")
    with pytest.raises(ValueError, match="unknown self_tap"):
        nfcore.InvConv(k=3, self_tap="diagonal")


def test_reference_slogdet_matches_numpy_including_sign():
    rng = np.random.default_rng(12)
    matrices = rng.standard_normal((6, 7, 7))
    sign, logdet = reference.slogdet(matrices)
    expected_sign, expected_logdet = np.linalg.slogdet(matrices)
    np.testing.assert_array_equal(sign, expected_sign)
    np.testing.assert_allclose(logdet, expected_logdet, rtol=1e-12)


def test_raster_method_solves_the_same_system():
    rng = np.random.default_rng(13)
    layer = nfcore.InvConv(k=3, channels=4, corner="bottom-left", learn_diag=True, dtype=np.float64)
    random_params(layer, rng)
    y = rng.standard_normal((2, 4, 5, 6))
    np.testing.assert_allclose(layer.inverse(y, method="raster"), layer.inverse(y), rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="unknown inverse method"):
        layer.inverse(y, method="dense")


# ---- the register-blocked CPU kernels against the plain ones and the references ------------

BLOCKED_CHANNELS = [1, 2, 3, 4, 6, 7, 8, 12, 48]
BLOCKED_BATCHES = [1, 8, 9, 16, 37, 64]


def blocked_case(G, B, C, k, dtype, seed=14, Hk=4, Wk=5):
    """x, dy and w in the cpu module's batch-last layout (G, H, W, C, B), w's self-tap
    L = w[.., k-1, k-1].T lower triangular with a unit-ish diagonal."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((G, Hk, Wk, C, B)).astype(dtype)
    dy = rng.standard_normal((G, Hk, Wk, C, B)).astype(dtype)
    w = (rng.standard_normal((G, k, k, C, C)) * 0.3 / np.sqrt(k * k * C)).astype(dtype)
    w[:, k - 1, k - 1] = np.triu(w[:, k - 1, k - 1]) + np.eye(C, dtype=dtype)
    return x, dy, w


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("B", BLOCKED_BATCHES)
@pytest.mark.parametrize("C", BLOCKED_CHANNELS)
def test_blocked_cpu_kernels_match_plain_and_numpy(C, B, k, dtype, tol):
    """The register-blocked kernels (cpu.conv_forward, conv_input_grad, the inverses) against
    the plain ones (cpu.*_plain) and numpy_ref, at every channel count the blocks split
    differently (C = 7: 4 + 3, 12: 6 + 6, 48: 8 × 6), batches under one register (B = 1, padded
    inside), ragged (9, 37: rows of 16 then a tail of 8, padded) and whole (8, 16, 64)."""
    G = 2 if C % 2 else 1
    x, dy, w = blocked_case(G, B, C, k, dtype)
    axes = cpu_module.AXES
    canonical = lambda a: from_layout(a, axes)                          # noqa: E731

    def close(a, b):
        assert a.dtype == dtype and a.shape == b.shape
        assert np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max())

    y = cpu_module.conv_forward(x, w)
    close(y, cpu_module.conv_forward_plain(x, w))
    close(canonical(y), numpy_ref.conv_forward(canonical(x), w))
    dx = cpu_module.conv_input_grad(dy, w)
    close(dx, cpu_module.conv_input_grad_plain(dy, w))
    close(canonical(dx), numpy_ref.conv_input_grad(canonical(dy), w))
    dw = cpu_module.conv_weight_grad(x, dy, k)
    close(dw, cpu_module.conv_weight_grad_plain(x, dy, k))
    close(dw, numpy_ref.conv_weight_grad(canonical(x), canonical(dy), k))

    x_plain = cpu_module.wavefront_inverse_plain(y, w)
    solves = [cpu_module.sweep_inverse(y, w), cpu_module.diagonal_inverse(y, w),
              cpu_module.wavefront_inverse(y, w), cpu_module.raster_inverse(y, w)]
    for x_solved in solves:
        close(x_solved, x)
        close(x_solved, x_plain)
        np.testing.assert_array_equal(x_solved, solves[0])     # the same operations per image
    close(cpu_module.conv_forward(solves[0], w), y)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blocked_cpu_kernels_give_each_image_the_same_bits(dtype):
    """Every image gets the same operations in the same order wherever it sits in the batch,
    whatever the chunk, block or thread that handles it: its result alone (B = 1, padded inside)
    is bit for bit its result in the batch, for the forward and both inverse schedules; and the
    results (the weight gradient's too) do not depend on the number of threads."""
    import numba
    x, _, w = blocked_case(3, 37, 7, 3, dtype, seed=15, Hk=6, Wk=5)
    y = cpu_module.conv_forward(x, w)
    kernels = {"forward": (cpu_module.conv_forward, x), "sweep": (cpu_module.sweep_inverse, y),
               "diagonal": (cpu_module.diagonal_inverse, y)}
    full = {name: kernel(a, w) for name, (kernel, a) in kernels.items()}
    for n in (0, 8, 16, 36):
        for name, (kernel, a) in kernels.items():
            np.testing.assert_array_equal(kernel(np.ascontiguousarray(a[..., n:n + 1]), w),
                                          full[name][..., n:n + 1], err_msg=name)
    dy = np.ascontiguousarray(y[::-1])
    dw = cpu_module.conv_weight_grad(x, dy, 3)
    threads = numba.get_num_threads()
    try:
        for count in range(1, threads + 1):
            numba.set_num_threads(count)
            for name, (kernel, a) in kernels.items():
                np.testing.assert_array_equal(kernel(a, w), full[name], err_msg=f"{name}, {count}")
            np.testing.assert_array_equal(cpu_module.conv_weight_grad(x, dy, 3), dw)
    finally:
        numba.set_num_threads(threads)


def test_blocked_cpu_kernels_use_fused_simd_registers():
    """The blocks compile to fused multiply-adds on whole SIMD registers (ymm or zmm): a fresh
    compile of the forward and solve blocks at P = 6, 64 bytes of float32 images, has at least
    six vfmadd...ps on %ymm/%zmm each (x86 with AVX2 + FMA only)."""
    import re

    import numba
    from numba import types

    from nfcore.kernels import cpu_blocked
    features = numba.config.CPU_FEATURES or ""
    try:
        import llvmlite.binding as llvm
        host = llvm.get_host_cpu_features()
        has_fma = host.get("fma", False) and host.get("avx2", False)
    except Exception:                                   # pragma: no cover - not x86 / old llvmlite
        has_fma = "+fma" in features
    if not has_fma:
        pytest.skip("the host has no AVX2 + FMA")
    array = types.Array(types.float32, 5, "C")
    index = (types.int64,) * 5
    block = cpu_blocked.Block(types.float32, 6, 16)
    for kernel in (cpu_blocked._forward_block, cpu_blocked._solve_block):
        fresh = numba.njit(kernel.py_func)
        signature = (array, array, array) + index + (block,)
        fresh.compile(signature)
        asm = fresh.inspect_asm(signature)
        fused = re.findall(r"vfmadd\d{3}ps\s[^\n]*%[yz]mm", asm)
        assert len(fused) >= 6, kernel.py_func.__name__


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B,C,H,W,G", [(64, 12, 16, 16, 1), (9, 8, 5, 6, 4), (37, 12, 17, 9, 4),
                                       (1, 3, 4, 4, 1), (16, 48, 16, 16, 1), (20, 4, 3, 11, 2)],
                         ids=str)
def test_tiled_layout_conversions_match_the_plain_ones(B, C, H, W, G, dtype):
    """cpu.to_groups / from_groups (8×8 or 4×4 tiles transposed in registers, ragged edges
    element by element) give exactly what the element-by-element versions give, for every
    combination of row, column and channel flips, groups flipped differently."""
    x = np.random.default_rng(16).standard_normal((B, C, H, W)).astype(dtype)
    for flip in itertools.product([0, 1], repeat=3):
        flips = np.array([flip] * G, dtype=np.int8)
        flips[1::2, 1] = 1 - flips[1::2, 1]
        grouped = cpu_module.to_groups(x, flips)
        np.testing.assert_array_equal(grouped, cpu_module.to_groups_plain(x, flips))
        np.testing.assert_array_equal(cpu_module.from_groups(grouped, flips, B), x)
        np.testing.assert_array_equal(cpu_module.from_groups(grouped, flips, B),
                                      cpu_module.from_groups_plain(grouped, flips, B))
    transposed = np.asfortranarray(x)                         # not C-contiguous: copied first
    np.testing.assert_array_equal(cpu_module.to_groups(transposed, flips),
                                  cpu_module.to_groups_plain(x, flips))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_partial_sums_of_the_weight_gradient_add_up_as_numpy_does(dtype):
    """cpu_blocked.sum_partials (bands, chunks and lanes summed in float64, a fixed order)
    against NumPy's float64 sum of the same partials, to the partials' own rounding."""
    from nfcore.kernels import cpu_blocked
    rng = np.random.default_rng(21)
    partial = rng.standard_normal((2, 3, 2, 3, 3, 5, 4, 32)).astype(dtype)
    expected = partial.astype(np.float64).sum(axis=(1, 2, 7))
    got = cpu_blocked.sum_partials(partial)
    assert got.dtype == dtype and got.shape == (2, 3, 3, 5, 4)
    rounding = np.finfo(dtype).eps * np.abs(partial).sum(axis=(1, 2, 7))
    assert np.all(np.abs(got - expected) <= rounding + np.finfo(dtype).eps * np.abs(expected))
