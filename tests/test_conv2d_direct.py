"""The coupling networks' direct convolution (nfcore/nn/conv2d_direct.py) against an
independent dense loop and against the im2col products it replaces; its gradients through
Conv2d against float64 finite differences; results independent of threads and batch."""
import re

import numba
import numpy as np
import pytest

from nfcore.nn import conv2d
from nfcore.nn import conv2d_direct as direct
from nfcore.nn.conv2d import Conv2d


def dense_conv(x, weight):
    """y[n, i, j, o] = sum over the taps inside the image of weight[o, c, a, b] ·
    x[n, i - p + a, j - p + b, c]: four loops, float64."""
    B, H, W, C = x.shape
    O, _, k, _ = weight.shape
    p = k // 2
    y = np.zeros((B, H, W, O))
    for i in range(H):
        for j in range(W):
            for a in range(k):
                for b in range(k):
                    si, sj = i - p + a, j - p + b
                    if 0 <= si < H and 0 <= sj < W:
                        y[:, i, j, :] += x[:, si, sj, :].astype(np.float64) @ weight[:, :, a, b].T
    return y


SHAPES = [(3, 5, 7, 6, 64, 3), (2, 16, 16, 64, 12, 3), (2, 4, 4, 24, 64, 3), (1, 1, 1, 3, 5, 3),
          (2, 6, 3, 5, 20, 5), (2, 3, 9, 4, 16, 1), (1, 2, 13, 7, 40, 3), (2, 5, 30, 3, 17, 3)]


@pytest.mark.parametrize("dtype,tolerance", [(np.float64, 1e-13), (np.float32, 2e-6)])
@pytest.mark.parametrize("B,H,W,C,O,k", SHAPES, ids=str)
def test_direct_convolution_and_its_input_gradient_match_a_dense_loop(B, H, W, C, O, k, dtype,
                                                                      tolerance):
    """Both kernels (rows of output channels, and the output side: k·k·O products per pixel
    gathered back), and both input gradients. Edges (1×1 images, images narrower than the
    kernel), every block width of a row (W = 30: 16 + 12 + 2 pixels), output channels that fill
    1 to 4 rows or part of one, 1×1 to 5×5. The input gradient is checked as the adjoint: <dy, conv(x)> = <dx(dy), x> for the dense
    loop's conv, so it is compared with nothing of the kernel's own making."""
    rng = np.random.default_rng(B * 1000 + H * 100 + W)
    x = rng.standard_normal((B, H, W, C)).astype(dtype)
    weight = rng.standard_normal((O, C, k, k)).astype(dtype)
    dy = rng.standard_normal((B, H, W, O)).astype(dtype)
    expected = dense_conv(x, weight)
    for forward in (direct.conv2d_direct, direct.conv2d_direct_output_side):
        y = forward(x, weight)
        assert y.dtype == dtype and y.shape == (B, H, W, O) and y.flags.c_contiguous
        np.testing.assert_allclose(y, expected, rtol=0, atol=tolerance * np.abs(expected).max())
    probes = rng.standard_normal((5,) + x.shape)
    for input_grad in (direct.conv2d_direct_input_grad,
                       direct.conv2d_direct_output_side_input_grad):
        dx = input_grad(dy, weight)
        assert dx.shape == x.shape and dx.flags.c_contiguous
        # dx = J^T dy for the linear map x -> dense_conv(x): <dy, J v> = <dx, v> for random v.
        for probe in probes:
            left = float(np.sum(dy.astype(np.float64) * dense_conv(probe, weight)))
            right = float(np.sum(dx.astype(np.float64) * probe))
            scale = float(np.sum(np.abs(dx.astype(np.float64) * probe)))
            assert abs(left - right) <= 10 * tolerance * scale, (left, right)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_direct_convolution_is_the_im2col_one(dtype):
    """At the coupling networks' shapes the direct kernels and the im2col products (their
    reference, conv2d.DIRECT = False) agree to rounding."""
    rng = np.random.default_rng(3)
    for C, O, H in [(6, 64, 16), (64, 12, 16), (12, 64, 8), (64, 48, 4), (64, 24, 8)]:
        x = rng.standard_normal((7, H, H, C)).astype(dtype)
        weight = rng.standard_normal((O, C, 3, 3)).astype(dtype)
        reference = conv2d.conv_forward_input_side(x, weight)
        tolerance = 1e-5 if dtype == np.float32 else 1e-13
        for forward in (direct.conv2d_direct, direct.conv2d_direct_output_side):
            np.testing.assert_allclose(forward(x, weight), reference, rtol=0,
                                       atol=tolerance * np.abs(reference).max())


def on_one_and_all_threads(function, *args):
    """(function(*args) on one Numba thread, the same on all of them)."""
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = function(*args)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        return one, function(*args)
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("kernel,C,O", [("conv2d_direct", 12, 64),
                                        ("conv2d_direct_output_side", 64, 12)])
def test_results_do_not_depend_on_threads_or_on_the_other_images(kernel, C, O):
    """Every output gets the same operations in the same order: bit for bit the same on 1 and 2
    threads, and an image alone gets exactly what it gets inside a batch."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((9, 16, 16, C)).astype(np.float32)
    weight = rng.standard_normal((O, C, 3, 3)).astype(np.float32)
    convolution = getattr(direct, kernel)
    one, many = on_one_and_all_threads(convolution, x, weight)
    np.testing.assert_array_equal(one, many)
    np.testing.assert_array_equal(convolution(x[4:5], weight), one[4:5])


@pytest.mark.parametrize("C,O", [(6, 64), (64, 12), (12, 16), (64, 6), (160, 8), (8, 160)])
def test_conv2d_gradients_with_the_direct_kernel_match_finite_differences(C, O):
    """Conv2d (which picks a direct kernel for its forward and its input gradient:
    ``conv2d_direct.method``; these shapes take each kernel each way) against float64
    directional finite differences of its own forward, for dx and dweight."""
    rng = np.random.default_rng(C + O)
    conv = Conv2d(O, 3, in_channels=C, dtype=np.float64, seed=1)
    conv.params["bias"][:] = rng.standard_normal(O)
    x = rng.standard_normal((2, 5, 6, C))
    dy = rng.standard_normal((2, 5, 6, O))
    assert conv._direct_method(x, C, O) == direct.method(C, O, 8) is not None
    assert conv._direct_method(x, O, C) == direct.method(O, C, 8) is not None
    conv.zero_grad()
    conv.forward(x)
    dx = conv.backward(dy)
    dweight = conv.grads["weight"].copy()
    eps = 1e-6
    for _ in range(3):
        v = rng.standard_normal(x.shape)
        numeric = np.sum(dy * (conv.forward(x + eps * v) - conv.forward(x - eps * v))) / (2 * eps)
        assert abs(numeric - np.sum(dx * v)) <= 1e-7 * (1 + abs(numeric))
        u = rng.standard_normal(dweight.shape)
        weight = conv.params["weight"].copy()
        conv.params["weight"][:] = weight + eps * u
        plus = conv.forward(x)
        conv.params["weight"][:] = weight - eps * u
        minus = conv.forward(x)
        conv.params["weight"][:] = weight
        numeric = np.sum(dy * (plus - minus)) / (2 * eps)
        assert abs(numeric - np.sum(dweight * u)) <= 1e-7 * (1 + abs(numeric))


def test_which_convolutions_take_the_direct_kernels():
    """Outputs that fill their rows (whole rows, or one row at least 3/4 full) from inputs not
    8× wider: the rows kernel; other narrower outputs: the output side; never 1×1 convolutions
    (one GEMM) nor with conv2d.DIRECT off."""
    lanes = direct.ROW_BYTES // 4
    assert direct.fills_its_rows(64, 4) and direct.fills_its_rows(lanes, 4)
    assert direct.fills_its_rows(3 * lanes // 4, 4)
    assert not direct.fills_its_rows(6, 4) and not direct.fills_its_rows(lanes + 8, 4)
    assert direct.method(6, 64, 4) == "direct" and direct.method(64, 12, 4) == "direct"
    assert direct.method(64, 6, 4) == "output_side" and direct.method(512, 12, 4) == "output_side"
    assert direct.method(3, 6, 4) is None
    x = np.zeros((1, 4, 4, 64), dtype=np.float32)
    assert Conv2d(64, 1, in_channels=64)._direct_method(x, 64, 64) is None
    assert Conv2d(64, 3, in_channels=64)._direct_method(x, 64, 64) == "direct"
    conv2d_off = Conv2d(64, 3, in_channels=64)
    try:
        conv2d.DIRECT = False
        assert conv2d_off._direct_method(x, 64, 64) is None
    finally:
        conv2d.DIRECT = True


def test_the_block_compiles_to_simd_fused_multiply_adds():
    """The compiled block of 6 pixels × 4 rows of float32 output channels has at least 24
    vfmadd...ps on %ymm/%zmm (x86 with AVX2 + FMA only)."""
    from numba import types

    from nfcore.kernels import cpu_blocked
    try:
        import llvmlite.binding as llvm
        host = llvm.get_host_cpu_features()
        has_fma = host.get("fma", False) and host.get("avx2", False)
    except Exception:                                   # pragma: no cover - not x86 / old llvmlite
        has_fma = False
    if not has_fma:
        pytest.skip("the host has no AVX2 + FMA")
    array4, array3 = types.Array(types.float32, 4, "C"), types.Array(types.float32, 3, "C")
    block = cpu_blocked.OuterBlock(types.float32, 3, 4, direct.ROW_BYTES // 4)
    signature = (array4, array3, array4) + (types.int64,) * 4 + (block,)
    fresh = numba.njit(direct._conv_block.py_func)
    fresh.compile(signature)
    fused = re.findall(r"vfmadd\d{3}ps\s[^\n]*%[yz]mm", fresh.inspect_asm(signature))
    assert len(fused) >= 12
