"""InvConv and FInCUnit on CuPy arrays against the same layers on NumPy arrays (real GPU only).

The CuPy path is the one users run: the layer sees CuPy arrays, ``kernels.for_array`` picks the
CUDA kernels, and they launch on CuPy's current stream. Under the simulator there is no CuPy;
test_cuda_kernels.py runs the layers on the CUDA kernels with NumPy arrays instead.
"""
import numpy as np
import pytest

import nfcore

from .conftest import AVAILABLE, CUPY, SIMULATOR, SKIP_REASON, assert_close, to_host

pytestmark = pytest.mark.skipif(
    not CUPY, reason=SKIP_REASON if not AVAILABLE
    else "needs CuPy and a real GPU (the simulator has no CuPy: test_cuda_kernels.py runs the "
         "layers on the CUDA kernels there)" if SIMULATOR
    else "needs CuPy (a real GPU is present, but CuPy is not installed or sees no GPU)")

DTYPES = (np.float32, np.float64)


def layer_results(make_layer, params, x, dy, dlogdet, xp):
    """forward, backward, inverse of a fresh layer on ``xp`` arrays, with the given weights."""
    layer = make_layer()
    x, dy, dlogdet = xp.asarray(x), xp.asarray(dy), xp.asarray(dlogdet)
    layer.forward(x)                                  # builds the weights on x's device
    layer.params = {name: xp.asarray(p) for name, p in params.items()}
    layer.zero_grad()
    y, logdet = layer.forward(x)
    dx = layer.backward(dy, dlogdet)
    x_back = layer.inverse(y)
    return [y, logdet, dx, x_back] + [layer.grads[name] for name in sorted(layer.grads)]


def check_cupy_against_numpy(make_layer, shape, dtype):
    import cupy
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    dlogdet = rng.standard_normal(shape[0]).astype(dtype)
    template = make_layer()
    template.forward(x)
    params = {name: p + (0.3 * rng.standard_normal(p.shape)).astype(dtype)
              for name, p in template.params.items()}
    on_numpy = layer_results(make_layer, params, x, dy, dlogdet, np)
    on_cupy = layer_results(make_layer, params, x, dy, dlogdet, cupy)
    for got, want in zip(on_cupy, on_numpy):
        assert type(got).__module__.startswith("cupy")
        assert_close(got, want, dtype)
    assert_close(on_cupy[3], x, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("learn_diag", [False, True], ids=["unit_diag", "learn_diag"])
@pytest.mark.parametrize("corner", nfcore.CORNERS)
def test_invconv_cupy_matches_numpy(corner, learn_diag, k, dtype):
    def make_layer():
        return nfcore.InvConv(k=k, corner=corner, learn_diag=learn_diag, seed=1)
    check_cupy_against_numpy(make_layer, (3, 5, 7, 6), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layer_class", [nfcore.CInCConv, nfcore.EmergingConv])
def test_published_cinc_and_emerging_cupy_match_numpy(layer_class, dtype):
    def make_layer():
        return layer_class(k=3, seed=1)
    check_cupy_against_numpy(make_layer, (3, 5, 7, 6), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(2, 12, 8, 11), (4, 48, 16, 16)], ids=str)
def test_finc_unit_cupy_matches_numpy(shape, dtype):
    """The second shape has more (pixel, channel) items per diagonal than a block has threads."""
    def make_layer():
        return nfcore.FInCUnit(k=3, seed=2)
    check_cupy_against_numpy(make_layer, shape, dtype)


def test_kernels_run_on_cupys_current_stream():
    """Launched on a non-default CuPy stream, the kernels order with the CuPy work around them
    (no explicit synchronization between them)."""
    import cupy

    from nfcore.kernels import CanonicalLayout, cpu as cpu_module, cuda as gpu
    cpu = CanonicalLayout(cpu_module)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 8, 16, 16, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 6, 6)).astype(np.float32) * 0.1
    for g in range(4):
        w[g, 2, 2] = np.triu(w[g, 2, 2], 1) + np.eye(6, dtype=np.float32)
    with cupy.cuda.Stream(non_blocking=True) as stream:
        x_d = cupy.asarray(x) * 1                       # queued on `stream`
        y_d = gpu.conv_forward(x_d, cupy.asarray(w))
        x_back = gpu.wavefront_inverse(y_d + 0, cupy.asarray(w))
        result = x_back.get(stream=stream)
        stream.synchronize()
    np.testing.assert_allclose(result, cpu.wavefront_inverse(cpu.conv_forward(x, w), w),
                               rtol=1e-4, atol=1e-4)


def every_layer_case():
    """The harness's cases (tests/test_layers.py): adding a layer there adds it here."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "test_layers.py"
    spec = importlib.util.spec_from_file_location("nfcore_layer_harness", path)
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    return harness.CASES, harness.make_input


CASES, make_input = every_layer_case()


def run_layer(case, x, dy_seed, xp, params=None):
    """forward, backward and inverse of a fresh layer on ``xp`` arrays (weights from params)."""
    layer = case.make()
    x = xp.asarray(x)
    layer.forward(x)                                   # builds weights (and ActNorm's init)
    for name, value in (params or {}).items():
        layer.params[name][...] = xp.asarray(value)
    layer.zero_grad()
    y, logdet = layer.forward(x)
    rng = np.random.default_rng(dy_seed)
    dy = xp.asarray(rng.standard_normal(y.shape).astype(x.dtype))
    dlogdet = xp.asarray(rng.standard_normal(x.shape[0]).astype(x.dtype))
    dx = layer.backward(dy, dlogdet)
    x_back = layer.inverse(y, z2=layer.z2) if isinstance(layer, nfcore.Split) else layer.inverse(y)
    results = [y, logdet, dx, x_back] + [layer.grads[name] for name in sorted(layer.grads)]
    return results, {name: to_host(p) for name, p in layer.params.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_every_layer_cupy_matches_numpy(case, dtype):
    """Every layer's forward, backward (all gradients) and inverse agree on CuPy and NumPy."""
    import cupy
    x = make_input(case, dtype)
    on_numpy, params = run_layer(case, x, 3, np)
    rng = np.random.default_rng(4)                      # wake zero-initialized parameters up
    params = {name: (p + 0.1 * rng.standard_normal(p.shape)).astype(p.dtype)
              for name, p in params.items()}
    on_numpy, _ = run_layer(case, x, 3, np, params)
    on_cupy, _ = run_layer(case, x, 3, cupy, params)
    for got, want in zip(on_cupy, on_numpy):
        assert type(got).__module__.startswith("cupy")
        assert_close(got, want, dtype)


def test_numpy_weights_with_a_cupy_input_is_one_clear_error():
    import cupy
    layer = nfcore.InvConv(k=3, channels=4)                       # NumPy weights
    x = cupy.zeros((2, 4, 8, 8), dtype=cupy.float32)
    with pytest.raises(TypeError, match="^x is a CuPy \\(GPU\\) array but the layer's parameter "
                                        "'weight' is a NumPy \\(CPU\\) array"):
        layer.forward(x)


def test_training_steps_reuse_cupys_memory_pool():
    """After the first steps, a training step takes all its device memory from what CuPy's pool
    already holds: the pool does not grow (every kernel output is a CuPy array from the pool)."""
    import cupy
    from nfcore.flow import Flow
    from nfcore.optim import Adam
    nfcore.set_backend("gpu")
    try:
        flow = Flow((3, 16, 16), levels=2, steps=2, hidden=16, invconv="finc", seed=0)
        x = cupy.asarray(np.random.default_rng(0).uniform(-0.5, 0.5, (8, 3, 16, 16)),
                         dtype=cupy.float32)
        flow.forward(x)
        optimizer = Adam(flow.layers, lr=1e-3, max_grad_norm=50.0)
        pool = cupy.get_default_memory_pool()
        held = []
        for _ in range(6):
            optimizer.zero_grad()
            flow.loss_and_backward(x, 8)
            optimizer.step()
            held.append(pool.total_bytes())
        assert held[2:] == [held[2]] * 4, held
    finally:
        nfcore.set_backend("cpu")
