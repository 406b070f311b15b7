"""Conv2d's blocked products (nfcore/nn/conv2d.py: the expanded matrix built a few images at a
time in a reused buffer) against the whole-batch ones, on both sides, forward and backward."""
import numpy as np
import pytest

import nfcore.nn.conv2d as conv2d
from nfcore.nn import Conv2d, col2im_into, col2im_numpy, im2col_into, im2col_numpy

TOL = {np.float32: 2e-5, np.float64: 1e-12}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B, H, W, C, O, k", [(1, 5, 3, 3, 7, 3), (3, 4, 5, 6, 2, 3),
                                              (64, 3, 3, 2, 5, 3), (3, 6, 5, 4, 9, 5),
                                              (64, 2, 3, 7, 3, 5)])
def test_blocked_conv_matches_the_whole_batch(B, H, W, C, O, k, dtype, monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, H, W, C)).astype(dtype)
    dy = rng.standard_normal((B, H, W, O)).astype(dtype)
    weight = rng.standard_normal((O, C, k, k)).astype(dtype)
    monkeypatch.setattr(conv2d, "BLOCK_THREADS", 10 ** 6)
    results = {}
    for block_bytes in (None, 1, H * W * k * k * min(C, O) * np.dtype(dtype).itemsize * 2 + 1):
        monkeypatch.setattr(conv2d, "BLOCK_BYTES", block_bytes)
        if block_bytes is not None:
            assert conv2d.images_per_block(x, k * k * min(C, O)) in (1, min(B, 2))
        results[block_bytes] = [
            conv2d.conv_forward_input_side(x, weight), *conv2d.conv_backward_input_side(dy, x, weight),
            conv2d.conv_forward_output_side(x, weight), *conv2d.conv_backward_output_side(dy, x, weight)]
    whole = results.pop(None)
    for blocked in results.values():
        for got, want in zip(blocked, whole):
            assert got.shape == want.shape and got.dtype == dtype
            np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype] * 10)
    for a, b in ((0, 3), (1, 4), (2, 5)):        # the two sides agree too
        np.testing.assert_allclose(whole[a], whole[b], rtol=TOL[dtype], atol=TOL[dtype] * 10)


def test_conv2d_blocks_only_on_few_threads(monkeypatch):
    x = np.zeros((64, 16, 16, 6), np.float32)
    monkeypatch.setattr(conv2d, "BLOCK_THREADS", 0)
    assert conv2d.images_per_block(x, 54) == 64
    monkeypatch.setattr(conv2d, "BLOCK_THREADS", 10 ** 6)
    assert conv2d.images_per_block(x, 54) == conv2d.BLOCK_BYTES // (256 * 54 * 4)
    monkeypatch.setattr(conv2d, "BLOCK_BYTES", None)
    assert conv2d.images_per_block(x, 54) == 64


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv2d_layer_blocked_matches_whole(dtype, monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 4, 6, 3)).astype(dtype)
    dy = rng.standard_normal((5, 4, 6, 8)).astype(dtype)
    monkeypatch.setattr(conv2d, "BLOCK_THREADS", 10 ** 6)
    out = []
    for block_bytes in (None, 1):
        monkeypatch.setattr(conv2d, "BLOCK_BYTES", block_bytes)
        conv = Conv2d(8, 3, dtype=dtype, seed=2)
        out.append([conv.forward(x), conv.backward(dy), conv.grads["weight"], conv.grads["bias"]])
    for got, want in zip(*out):
        np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype] * 10)


def test_into_kernels_write_slices():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3, 5, 2))
    cols = np.full((2 * 15, 18), np.nan)
    im2col_into(x[1:3], 3, cols)
    np.testing.assert_array_equal(cols, im2col_numpy(x[1:3], 3))
    out = np.full((4, 3, 5, 2), 7.0)
    col2im_into(cols, out[2:4], 3)
    assert (out[:2] == 7.0).all()
    np.testing.assert_allclose(out[2:4], col2im_numpy(cols, (2, 3, 5, 2), 3), rtol=1e-13)
