"""The CUDA kernels against the Numba CPU kernels, on tiny shapes (see conftest.py for the modes).

Layout: x, y (G, B, H, W, C) channel-last (the CUDA kernels' own; the batch-last CPU kernels
are seen through ``CanonicalLayout``); w (G, k, k, C_in, C_out) whose self-tap
w[g, k-1, k-1] is upper triangular in (ci, co), i.e. L[co, ci] = w[g, k-1, k-1, ci, co] is lower
triangular, with a nonzero diagonal.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nfcore
from nfcore import kernels
from nfcore.kernels import CanonicalLayout, cpu as cpu_module

from .conftest import assert_close, to_host

cpu = CanonicalLayout(cpu_module)   # the CPU kernels in the CUDA kernels' (G, B, H, W, C) layout

ROOT = Path(__file__).resolve().parents[2]
DTYPES = (np.float32, np.float64)
# (G, B, H, W, C): one and four groups, one and three channels, H != W, both orders
SHAPES = [(1, 2, 3, 5, 1), (4, 2, 4, 3, 3), (1, 2, 5, 4, 3), (4, 2, 3, 6, 1)]
KS = (1, 3, 5)


def make_weight(rng, G, k, C, dtype, C_out=None):
    """A valid effective weight: small taps; self-tap L lower triangular with diagonal in
    [0.5, 1.5] (so the inverse is well conditioned and the division by it is exercised)."""
    C_out = C if C_out is None else C_out
    w = rng.standard_normal((G, k, k, C, C_out)) * 0.4 / np.sqrt(k * k * C)
    if C_out == C:
        for g in range(G):
            w[g, k - 1, k - 1] = np.triu(w[g, k - 1, k - 1], 1)
            w[g, k - 1, k - 1][np.arange(C), np.arange(C)] = rng.uniform(0.5, 1.5, C)
    return w.astype(dtype)


def make_case(G, B, H, W, C, k, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((G, B, H, W, C)).astype(dtype)
    return x, make_weight(rng, G, k, C, dtype), rng


def check_output_kind(result, xp):
    """NumPy in, NumPy out; CuPy in, CuPy out."""
    assert type(result).__module__.split(".")[0] == xp.__name__


# ---- forward and its gradients --------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_gradients_match_cpu(gpu, xp, shape, k, dtype):
    x, w, rng = make_case(*shape, k, dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    x_d, w_d, dy_d = xp.asarray(x), xp.asarray(w), xp.asarray(dy)

    y = gpu.conv_forward(x_d, w_d)
    check_output_kind(y, xp)
    assert_close(y, cpu.conv_forward(x, w), dtype)
    assert_close(gpu.conv_input_grad(dy_d, w_d), cpu.conv_input_grad(dy, w), dtype)
    assert_close(gpu.conv_weight_grad(x_d, dy_d, k), cpu.conv_weight_grad(x, dy, k), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_rectangular_channel_maps(gpu, xp, dtype):
    """C_in != C_out (the kernels allow it, the inverse does not need it)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2, 3, 4, 2)).astype(dtype)
    w = make_weight(rng, 2, 3, 2, dtype, C_out=3)
    dy = rng.standard_normal((2, 2, 3, 4, 3)).astype(dtype)
    assert_close(gpu.conv_forward(xp.asarray(x), xp.asarray(w)), cpu.conv_forward(x, w), dtype)
    assert_close(gpu.conv_input_grad(xp.asarray(dy), xp.asarray(w)), cpu.conv_input_grad(dy, w),
                 dtype)
    assert_close(gpu.conv_weight_grad(xp.asarray(x), xp.asarray(dy), 3),
                 cpu.conv_weight_grad(x, dy, 3), dtype)


def test_weight_grad_with_many_row_bands(gpu, xp, monkeypatch):
    """Chunks of one row each (and of two rows with a short last band): the two-pass reduction
    must add every chunk exactly once."""
    x, w, rng = make_case(2, 3, 5, 4, 2, 3, np.float64)
    dy = rng.standard_normal(x.shape)
    expected = cpu.conv_weight_grad(x, dy, 3)
    for chunk in (1, 8):    # rows_per_chunk = 1, then 2 (bands of rows 0-1, 2-3, 4)
        monkeypatch.setattr(gpu, "WEIGHT_GRAD_CHUNK", chunk)
        assert_close(gpu.conv_weight_grad(xp.asarray(x), xp.asarray(dy), 3), expected, np.float64)


# ---- the inverses ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_wavefront_inverse_matches_cpu(gpu, xp, shape, k, dtype):
    x, w, _ = make_case(*shape, k, dtype)
    y = cpu.conv_forward(x, w)
    x_solved = gpu.wavefront_inverse(xp.asarray(y), xp.asarray(w))
    check_output_kind(x_solved, xp)
    assert_close(x_solved, cpu.wavefront_inverse(y, w), dtype)
    np.testing.assert_allclose(to_host(x_solved), x, rtol=1e-3 if dtype == np.float32 else 1e-9,
                               atol=1e-3 if dtype == np.float32 else 1e-9)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape, k", [((4, 2, 3, 5, 3), 3), ((1, 2, 4, 3, 1), 5),
                                      ((1, 1, 3, 4, 3), 1)], ids=str)
def test_raster_inverse_matches_cpu(gpu, xp, shape, k, dtype):
    x, w, _ = make_case(*shape, k, dtype)
    y = cpu.conv_forward(x, w)
    x_solved = gpu.raster_inverse(xp.asarray(y), xp.asarray(w))
    check_output_kind(x_solved, xp)
    assert_close(x_solved, cpu.raster_inverse(y, w), dtype)


@pytest.mark.parametrize("pixels_per_block", [1, 3, None])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_per_diagonal_inverse_matches_cpu(gpu, xp, dtype, pixels_per_block):
    """The one-launch-per-anti-diagonal variant, with blocks that split a diagonal's pixels
    (1 and 3 pixels per block: images and groups straddle blocks) and the default."""
    x, w, _ = make_case(4, 2, 3, 4, 3, 3, dtype)
    y = cpu.conv_forward(x, w)
    x_solved = gpu.wavefront_inverse_per_diagonal(xp.asarray(y), xp.asarray(w), pixels_per_block)
    assert_close(x_solved, cpu.wavefront_inverse(y, w), dtype)


@pytest.mark.parametrize("max_block", [1, 4])
def test_solves_with_more_work_items_than_threads(gpu, xp, monkeypatch, max_block):
    """Blocks smaller than a diagonal's (pixel, channel) items: each thread loops over several
    items between the barriers (on a GPU: large images or many channels)."""
    monkeypatch.setattr(gpu, "MAX_SOLVE_BLOCK", max_block)
    x, w, _ = make_case(2, 2, 4, 3, 3, 3, np.float64)
    y = cpu.conv_forward(x, w)
    expected = cpu.wavefront_inverse(y, w)
    y_d, w_d = xp.asarray(y), xp.asarray(w)
    assert_close(gpu.wavefront_inverse(y_d, w_d), expected, np.float64)
    assert_close(gpu.wavefront_inverse_per_diagonal(y_d, w_d, 2), expected, np.float64)
    assert_close(gpu.raster_inverse(y_d, w_d), expected, np.float64)


def test_inverse_uses_the_triangle_and_the_diagonal_only(gpu, xp):
    """Forward substitution reads L[co, ci] = w[g, k-1, k-1, ci, co] for co >= ci only: junk in
    the upper part of L (ci > co) changes nothing, as in the CPU kernel."""
    x, w, _ = make_case(2, 2, 3, 4, 3, 3, np.float64)
    y = cpu.conv_forward(x, w)
    junk = w.copy()
    for g in range(2):
        junk[g, 2, 2][np.tril_indices(3, -1)] = 100.0
    assert_close(gpu.wavefront_inverse(xp.asarray(y), xp.asarray(junk)),
                 cpu.wavefront_inverse(y, junk), np.float64)
    assert_close(gpu.wavefront_inverse(xp.asarray(y), xp.asarray(junk)), x, np.float64)


# ---- arrays in, arrays out ------------------------------------------------------------------
def test_non_contiguous_inputs_and_weight_cast_to_the_input_dtype(gpu, xp):
    x, w, _ = make_case(1, 2, 3, 4, 2, 3, np.float32)
    x_view = np.ascontiguousarray(x.transpose(0, 1, 3, 2, 4)).transpose(0, 1, 3, 2, 4)
    assert not x_view.flags.c_contiguous
    y = gpu.conv_forward(xp.asarray(x_view), xp.asarray(w.astype(np.float64)))
    assert to_host(y).dtype == np.float32
    assert_close(y, cpu.conv_forward(x, w), np.float32)


def test_refuses_integer_arrays_and_mismatched_weights(gpu):
    with pytest.raises(TypeError, match="float32 or float64"):
        gpu.conv_forward(np.zeros((1, 1, 2, 2, 1), np.int32), np.zeros((1, 1, 1, 1, 1)))
    with pytest.raises(ValueError, match="w must have shape"):
        gpu.wavefront_inverse(np.zeros((1, 1, 2, 2, 2)), np.zeros((1, 3, 3, 3, 3)))


def test_importing_nfcore_and_the_cuda_kernels_never_needs_cupy():
    """With every `import cupy` failing, nfcore and its CUDA kernel module still import."""
    code = (
        "import sys\n"
        "class NoCupy:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'cupy' or name.startswith('cupy.'):\n"
        "            raise ImportError('cupy blocked by the test')\n"
        "sys.meta_path.insert(0, NoCupy())\n"
        "import nfcore, nfcore.kernels.cuda\n"
        "assert 'cupy' not in sys.modules\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), NUMBA_ENABLE_CUDASIM="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT, timeout=120)


# ---- the layers on the CUDA kernels ---------------------------------------------------------
def layer_results(layer, x, dy, dlogdet):
    """forward, backward and inverse of a fresh layer: [y, logdet, dx, x_back, grads...]."""
    y, logdet = layer.forward(x)
    dx = layer.backward(dy, dlogdet)
    x_back = layer.inverse(y)
    return [y, logdet, dx, x_back] + [layer.grads[name] for name in sorted(layer.grads)]


def check_layer_on_cuda_kernels(make_layer, shape, dtype, monkeypatch, gpu):
    """The same layer (same weights, moved off their near-identity start) on the CPU kernels
    and then on the CUDA kernels (NumPy arrays: the layers are made to call the CUDA kernels
    for them; test_cupy_layers.py runs the true CuPy path on a real GPU)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    dlogdet = rng.standard_normal(shape[0]).astype(dtype)
    params = {name: p + (0.3 * rng.standard_normal(p.shape)).astype(dtype)
              for name, p in make_layer().params.items()}

    def results():
        layer = make_layer()
        for name, p in layer.params.items():
            p[...] = params[name]
        return layer_results(layer, x, dy, dlogdet)

    on_cpu = results()
    monkeypatch.setattr(kernels, "for_array", lambda a: gpu)
    on_gpu = results()
    assert len(on_gpu) == len(on_cpu)
    for got, want in zip(on_gpu, on_cpu):
        assert_close(got, want, dtype)
    assert_close(on_gpu[3], x, dtype)               # the inverse undoes the forward


@pytest.mark.parametrize("corner", nfcore.CORNERS)
@pytest.mark.parametrize("learn_diag", [False, True], ids=["unit_diag", "learn_diag"])
def test_invconv_layer_on_cuda_kernels(corner, learn_diag, monkeypatch, gpu):
    def make_layer():
        return nfcore.InvConv(k=3, channels=2, corner=corner, learn_diag=learn_diag,
                              dtype=np.float64, seed=1)
    check_layer_on_cuda_kernels(make_layer, (2, 2, 3, 4), np.float64, monkeypatch, gpu)


@pytest.mark.parametrize("corner", ["top-left", "bottom-right"])
def test_published_cinc_and_emerging_convs_on_cuda_kernels(corner, monkeypatch, gpu):
    """An upper self-tap (the channels reversed in the layout conversion) and a bias: the
    published CInC conv's form, and Emerging's two convolutions."""
    def make_invconv():
        return nfcore.InvConv(k=3, channels=3, corner=corner, learn_diag=True, dtype=np.float64,
                              seed=1, self_tap="upper", bias=True)
    check_layer_on_cuda_kernels(make_invconv, (2, 3, 3, 4), np.float64, monkeypatch, gpu)

    def make_emerging():
        return nfcore.EmergingConv(k=3, channels=3, dtype=np.float64, seed=1)
    check_layer_on_cuda_kernels(make_emerging, (2, 3, 4, 3), np.float64, monkeypatch, gpu)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_finc_unit_on_cuda_kernels(dtype, monkeypatch, gpu):
    def make_layer():
        return nfcore.FInCUnit(k=3, channels=8, dtype=dtype, seed=2)
    check_layer_on_cuda_kernels(make_layer, (2, 8, 4, 3), dtype, monkeypatch, gpu)
