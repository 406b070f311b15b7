"""The published CInC and Emerging convolutions (issue 19): their function family, pinned
independently of how nfcore stores the weights, and against a transcription of the official
code's forward pass.

- Jacobian patterns, read by probing ``forward`` alone (no weight is looked at): on a 1×1
  image the CInC conv's channel Jacobian is upper triangular (output co reads inputs ci >= co)
  and Emerging's is full; on an H ≠ W image the same holds for every pixel's own block, and
  each layer reads only its published window of neighbours.
- In a ``cinc`` flow step (ActNorm → CInC conv → coupling) the first channel's output at a
  pixel depends on the last channel's input at that same pixel.
- The forward pass equals the official ``forward_fast`` (TensorFlow, NHWC, filters
  [a, b, ci, co], cross-correlation with explicit padding), written out here in NumPy.
- The published initialisation, and older checkpoints of these layers being refused.
"""
import h5py
import numpy as np
import pytest

import nfcore
from nfcore.flow import flow_step
from train.checkpoint import load_checkpoint, save_checkpoint


def randomize(layer, rng, scale=0.3):
    """Random values in every parameter (masked entries included), bias and diagonals too."""
    for name, param in layer.params.items():
        param[...] = rng.standard_normal(param.shape) * scale


def probe_jacobian(layer, C, H, W):
    """(C, H, W, C, H, W) Jacobian of an affine layer, column by column: f(e) − f(0)."""
    zero = layer.forward(np.zeros((1, C, H, W)))[0][0]
    D = C * H * W
    basis = np.eye(D).reshape(D, C, H, W)
    columns = layer.forward(basis)[0] - zero                   # (D, C, H, W): column per input
    return np.moveaxis(columns, 0, -1).reshape(C, H, W, C, H, W)


def pixel_blocks(J):
    """{(di, dj): (H, W, C_out, C_in) blocks} of J for each input offset (di, dj) from the
    output pixel, over the output pixels where that input pixel exists."""
    C, H, W = J.shape[:3]
    blocks = {}
    for di in range(-(H - 1), H):
        for dj in range(-(W - 1), W):
            for i in range(H):
                for j in range(W):
                    if 0 <= i + di < H and 0 <= j + dj < W:
                        blocks.setdefault((di, dj), []).append(J[:, i, j, :, i + di, j + dj])
    return {offset: np.array(b) for offset, b in blocks.items()}


@pytest.mark.parametrize("H,W", [(1, 1), (3, 4)])
def test_cinc_jacobian_is_upper_triangular_at_the_self_tap(H, W):
    C = 5
    layer = nfcore.CInCConv(k=3, channels=C, dtype=np.float64)
    randomize(layer, np.random.default_rng(0))
    blocks = pixel_blocks(probe_jacobian(layer, C, H, W))
    own = blocks[(0, 0)]
    lower = np.tril(np.ones((C, C)), -1) > 0                   # [co, ci]: ci < co
    assert np.all(own[..., lower] == 0)                        # output co never reads ci < co
    assert np.all(own[..., ~lower] != 0)                       # but every ci >= co
    for (di, dj), block in blocks.items():                     # reads only its 3×3 top-left window
        inside = -2 <= di <= 0 and -2 <= dj <= 0
        assert np.any(block != 0) == inside, (di, dj)


@pytest.mark.parametrize("H,W", [(1, 1), (3, 4)])
def test_emerging_jacobian_is_full_at_the_self_tap(H, W):
    C = 5
    layer = nfcore.EmergingConv(k=3, channels=C, dtype=np.float64)
    randomize(layer, np.random.default_rng(1))
    blocks = pixel_blocks(probe_jacobian(layer, C, H, W))
    assert np.all(blocks[(0, 0)] != 0)                         # full channel block: not triangular
    for (di, dj), block in blocks.items():                     # the 3×3 window centred on (i, j)
        assert np.any(block != 0) == (abs(di) <= 1 and abs(dj) <= 1), (di, dj)


def test_cinc_step_first_channel_reads_last_channel_at_the_same_pixel():
    """ActNorm → CInC conv → affine coupling: the coupling passes the first half through, so
    this dependence exists only with the published (upper) self-tap."""
    C, H, W = 4, 3, 4
    rng = np.random.default_rng(2)
    step = flow_step("cinc", "affine", C, hidden=8, k=3, seed=0, dtype=np.float64)
    x = rng.standard_normal((1, C, H, W))

    def run(x):
        for layer in step:
            x, _ = layer.forward(x)
        return x

    run(x)                                                     # initializes the ActNorm
    for i, j in [(0, 0), (1, 2), (2, 3)]:
        nudged = x.copy()
        nudged[0, C - 1, i, j] += 1e-3
        change = run(nudged) - run(x)
        assert abs(change[0, 0, i, j]) > 1e-8                  # the default initialisation


# ---- the official forward pass, transcribed ----------------------------------------------

def correlate_valid(z, w):
    """tf.nn.conv2d(z, w, padding='VALID') for z (B, H, W, Ci), w (kh, kw, Ci, Co)."""
    kh, kw = w.shape[:2]
    B, H, W, _ = z.shape
    out = np.zeros((B, H - kh + 1, W - kw + 1, w.shape[3]))
    for a in range(kh):
        for b in range(kw):
            out += z[:, a:a + out.shape[1], b:b + out.shape[2]] @ w[a, b]
    return out


def published_cinc(z, w_s, bias):
    """``invertible_conv2D.forward_fast``: pad top-left by k-1, the k×k filter, + b (NHWC)."""
    pad = w_s.shape[0] - 1
    z = np.pad(z, ((0, 0), (pad, 0), (pad, 0), (0, 0)))
    return correlate_valid(z, w_s) + bias


def published_emerging(z, w1_s, w2_s, bias):
    """``invertible_conv2D_emerging.forward_fast``: pad bottom-right, w1; pad top-left, w2; + b."""
    pad = w1_s.shape[0] - 1
    z = correlate_valid(np.pad(z, ((0, 0), (0, pad), (0, pad), (0, 0))), w1_s)
    z = correlate_valid(np.pad(z, ((0, 0), (pad, 0), (pad, 0), (0, 0))), w2_s)
    return z + bias


def tf_filter(layer, reverse_taps):
    """A masked nfcore conv's effective weight [co, ci, a, b] as a TF filter [a, b, ci, co];
    a bottom-right layer's taps reversed (its tap (a, b) reads x[i+(k-1)-a, j+(k-1)-b])."""
    w = layer.effective_weight()[0].transpose(2, 3, 1, 0)
    return w[::-1, ::-1] if reverse_taps else w


def test_cinc_forward_is_the_published_forward():
    C, H, W = 4, 5, 6
    rng = np.random.default_rng(3)
    layer = nfcore.CInCConv(k=3, channels=C, dtype=np.float64)
    randomize(layer, rng)
    w_s = tf_filter(layer, reverse_taps=False)
    assert np.all(np.triu(w_s[2, 2], 1) == 0)                 # [ci, co]: reads only ci >= co
    x = rng.standard_normal((2, C, H, W))
    y, logdet = layer.forward(x)
    expected = published_cinc(x.transpose(0, 2, 3, 1), w_s, layer.params["bias"])
    np.testing.assert_allclose(y.transpose(0, 2, 3, 1), expected, rtol=0, atol=1e-13)
    np.testing.assert_allclose(logdet, H * W * np.log(np.abs(np.diag(w_s[2, 2]))).sum(), rtol=1e-13)


def test_emerging_forward_is_the_published_forward():
    C, H, W = 4, 5, 6
    rng = np.random.default_rng(4)
    layer = nfcore.EmergingConv(k=3, channels=C, dtype=np.float64)
    randomize(layer, rng)
    w1_s = tf_filter(layer.conv1, reverse_taps=True)           # self-tap at [0, 0]
    w2_s = tf_filter(layer.conv2, reverse_taps=False)          # self-tap at [1, 1]
    assert np.all(np.tril(w1_s[0, 0], -1) == 0)                # [ci, co]: w1 reads ci <= co
    assert np.all(np.triu(w2_s[1, 1], 1) == 0)                 # w2 reads ci >= co
    x = rng.standard_normal((2, C, H, W))
    y, logdet = layer.forward(x)
    expected = published_emerging(x.transpose(0, 2, 3, 1), w1_s, w2_s, layer.params["conv2.bias"])
    np.testing.assert_allclose(y.transpose(0, 2, 3, 1), expected, rtol=0, atol=1e-13)
    log_diagonals = np.log(np.abs(np.diag(w1_s[0, 0]))).sum() + np.log(np.abs(np.diag(w2_s[1, 1]))).sum()
    np.testing.assert_allclose(logdet, H * W * log_diagonals, rtol=1e-13)
    np.testing.assert_allclose(layer.inverse(y), x, rtol=0, atol=1e-12)


def test_published_initialisation():
    """Every weight N(0, 0.02²), each self-tap diagonal 1 + N(0, 0.02²), bias 0 (the official
    get_conv_weight_np); nfcore's own InvConv keeps its own scheme (std 0.1/sqrt(k²C))."""
    C = 48
    layer = nfcore.CInCConv(k=3, channels=C, dtype=np.float64, seed=5)
    w = layer.effective_weight()[0]                            # [co, ci, a, b]
    off_centre = w[:, :, :2, :].ravel()
    assert abs(off_centre.std() - 0.02) < 0.002 and abs(off_centre.mean()) < 0.002
    diagonal = np.diag(w[:, :, 2, 2])
    assert abs(diagonal.mean() - 1) < 0.01 and 0.01 < diagonal.std() < 0.03
    assert np.all(layer.params["bias"] == 0)
    emerging = nfcore.EmergingConv(k=3, channels=C, dtype=np.float64, seed=5)
    for conv in (emerging.conv1, emerging.conv2):
        assert abs(conv.params["weight"].std() - 0.02) < 0.002
    own = nfcore.InvConv(k=3, channels=C, dtype=np.float64)
    assert abs(own.params["weight"].std() - 0.1 / np.sqrt(9 * C)) < 0.001


# ---- checkpoints written before the published layers -------------------------------------

@pytest.mark.parametrize("invconv,refused", [("cinc", True), ("emerging", True),
                                              ("finc", False), ("glow1x1", False)])
def test_format_version_1_checkpoints_of_changed_layers_are_refused(tmp_path, invconv, refused):
    path = tmp_path / "checkpoint.h5"
    save_checkpoint(path, {"model/0/weight": np.zeros(3)}, {"config": {"invconv": invconv}})
    load_checkpoint(path)                                      # the current version loads
    with h5py.File(path, "r+") as file:
        file.attrs["format_version"] = 1
    if refused:
        with pytest.raises(ValueError, match=f"--invconv {invconv} checkpoint of format version 1.*"
                                             "published definition.*train the model again"):
            load_checkpoint(path)
    else:
        load_checkpoint(path)
