"""A PyTorch twin of nfcore.flow.Flow: the same flow, layer for layer, to time nfcore against.

    python bench/twin.py                                  # agreement check, then the small preset
    python bench/twin.py --preset wide --invconv finc glow1x1
    python bench/twin.py --check-only                     # the agreement check alone
    python bench/twin.py --preset paper --invconv finc    # the papers' model, one step
    python bench/twin.py --device cuda                    # nfcore on CuPy vs PyTorch CUDA

What the twin is: a reference for nfcore's speed. It is Flow's architecture written the way a
PyTorch user would write it: nn.Conv2d coupling networks (in channels-last memory format,
oneDNN's fastest at these shapes; --memory-format contiguous for NCHW), the masked k×k
convolution as F.pad on its corner + masked weight + F.conv2d (as the FInC code does), its
inverse a loop in PyTorch over anti-diagonals (over pixels for Emerging, as nfcore), autograd
for the gradients, torch.optim.Adam with clip_grad_norm_. ``from_nfcore`` copies every parameter
and layer state of an nfcore Flow (after its ActNorm initialization). Before timing anything,
both are checked to compute the same thing: log p per sample, every latent, every parameter
gradient of the mean bits/dim, and decode from the same latents, to 1e-10 (float64) or 1e-4
(float32) of the largest value of nfcore's array, on small models of every step kind with both
couplings; the run stops with exit status 1 otherwise.

What it is not: a second implementation to use. No checkpoints, data sets, warm-up schedule or
EMA; nothing in nfcore imports torch (install it with pip install -e .[bench]). With --device
cuda the twin runs on PyTorch CUDA and nfcore on CuPy, the agreement check included; the
thread settings below then apply to the host side only.

Timing: each side in a process of its own (nfcore's in bench/flow_timing.py, which says why: in
one process the two would share one OpenMP runtime, set up for one of them), the sides taking
turns, --rounds processes each (default 5); each process keeps its best call, and the table
gives the median over the processes and the median of the paired ratios, with their range (the
machine drifts by ±20%: best-of-3 figures swung). float32, the same thread count on both sides
(torch.set_num_threads and numba.set_num_threads; nfcore's NumPy BLAS gets --blas-threads, by
default as many as --threads, as in train.run), on uniform-noise 8-bit images of CIFAR's shape,
dequantized as train.run does, the same model on both sides (bench.flow_timing.make_flow, then
from_nfcore):

    train step   forward + backward + Adam step (global-norm clipping at 50): images/s, best of
                 several (paper: one step)
    sample       100 images at temperature 0.7, ONE thread on both sides (torch under
                 inference_mode): seconds, best of several
                 (timed first, on the initialized model: a few Adam steps on noise can make an
                 untrained model's samples overflow)

Ratios are nfcore's speed over torch's: above 1, nfcore is faster.
"""
import argparse
import contextlib
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):   # run as python bench/twin.py: the repository root, for bench.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numba
import numpy as np
import torch

# torch first, on purpose: this process times torch's side, with torch's own OpenMP settings
# (bench/flow_timing.py); nfcore's warning about a libgomp loaded before it does not apply here.
warnings.filterwarnings("ignore", message="an OpenMP runtime", category=RuntimeWarning)
import torch.nn.functional as F
from torch import nn

from bench.flow_timing import (LR, MAX_GRAD_NORM, N_BITS, N_SAMPLES, PRESETS, TEMPERATURE,
                               best_time, make_flow, repeats_of, synthetic_images)

from nfcore import layers as nf
from nfcore.backend import default_array_module, get_backend, set_backend, to_numpy
from nfcore.flow import COUPLINGS, STEP_KINDS, Flow
from nfcore.layers.coupling import SCALE_SHIFT
from nfcore.layers.invconv import GroupedMaskedConv
from nfcore.nn.conv2d_zero import LOGSCALE_FACTOR

TOLERANCE = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}  # of max |nfcore's array|
TORCH_DTYPE = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}
LOG_2PI = math.log(2 * math.pi)
# The coupling networks' memory format. oneDNN's convolutions at the small preset's shapes, one
# thread, 101 images, ms NCHW / channels-last: 6->64 3×3 16² 8.9 / 1.7, 64->64 1×1 16² 13.9 / 2.4,
# 64->12 3×3 16² 4.9 / 4.5, the other levels' within 0.8-1.0× (docs/benchmarks.md, the twin).
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
MEMORY_FORMAT = "channels_last"


# ---- the layers: forward(x) -> (y, logdet (B,)), inverse(y) -> x ------------------------------
# Submodules and parameters carry nfcore's names, so that a twin layer's named_parameters()
# has exactly the keys of the nfcore layer's params ("nn.conv1.weight", "conv2.log_diag", ...).

class Squeeze(nn.Module):
    """(B, C, H, W) -> (B, 4C, H/2, W/2): y[n, 4c + 2·di + dj, i, j] = x[n, c, 2i + di, 2j + dj]."""

    def forward(self, x):
        B, C, H, W = x.shape
        y = x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return y.reshape(B, 4 * C, H // 2, W // 2), x.new_zeros(B)

    def inverse(self, y):
        B, C4, H, W = y.shape
        x = y.reshape(B, C4 // 4, 2, 2, H, W).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(B, C4 // 4, 2 * H, 2 * W)


class ActNorm(nn.Module):
    """y = (x + bias) · exp(logs) per channel; logdet = H·W·Σ logs. The data-dependent
    initialization is nfcore's: ``from_nfcore`` copies bias and logs after it has run."""

    def __init__(self, channels):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.logs = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        B, _, H, W = x.shape
        y = (x + self.bias[:, None, None]) * self.logs.exp()[:, None, None]
        return y, (H * W * self.logs.sum()).expand(B)

    def inverse(self, y):
        return y * (-self.logs).exp()[:, None, None] - self.bias[:, None, None]


class Conv1x1(nn.Module):
    """Glow's LU 1×1 convolution: W = P·L·U with L = tril(lower, -1) + I and
    U = triu(upper, 1) + diag(sign_s · exp(log_s)); logdet = H·W·Σ log_s.
    perm (P as row indices) and sign_s are fixed buffers."""

    def __init__(self, channels):
        super().__init__()
        self.lower = nn.Parameter(torch.zeros(channels, channels))
        self.upper = nn.Parameter(torch.zeros(channels, channels))
        self.log_s = nn.Parameter(torch.zeros(channels))
        self.register_buffer("perm", torch.arange(channels))
        self.register_buffer("sign_s", torch.ones(channels))

    def weight(self):
        """W (C, C)."""
        eye = torch.eye(len(self.log_s), dtype=self.log_s.dtype, device=self.log_s.device)
        L = self.lower.tril(-1) + eye
        U = self.upper.triu(1) + torch.diag(self.sign_s * self.log_s.exp())
        return (L @ U)[self.perm]

    def forward(self, x):
        B, _, H, W = x.shape
        return F.conv2d(x, self.weight()[:, :, None, None]), (H * W * self.log_s.sum()).expand(B)

    def inverse(self, y):
        """W⁻¹ in float64 (as nfcore), applied per pixel."""
        W_inverse = torch.linalg.inv(self.weight().double()).to(y.dtype)
        return F.conv2d(y, W_inverse[:, :, None, None])


def corner_padding(corner, k):
    """F.pad's (left, right, top, bottom) for a masked conv whose taps reach towards ``corner``,
    and the image axes to flip to turn it into the top-left form (flip the weight the same way)."""
    top, left = corner.startswith("top"), corner.endswith("left")
    pad = ((k - 1, 0) if left else (0, k - 1)) + ((k - 1, 0) if top else (0, k - 1))
    flips = ([] if top else [-2]) + ([] if left else [-1])
    return pad, flips


def solve_top_left(y, w, order="wavefront", upper=False):
    """x with conv_top_left(x, w) = y, solved pixel after pixel or anti-diagonal after one.

    y (G, B, C, H, W); w (G, C, C, k, k), the effective weights, top-left form:
        y[g, n, co, i, j] = Σ_{ci,a,b} w[g, co, ci, a, b] · x[g, n, ci, i-(k-1)+a, j-(k-1)+b]
    Pixel (i, j) depends on the pixels above and to its left only, so it is solved once they are:
        r = y[i, j] − (every tap applied to x, pixel (i, j) itself still 0)
        x[i, j] = S⁻¹ r          S = w[..., k-1, k-1] (G, C, C), the triangular self-tap (lower,
                                 or ``upper``)
    ``order``: "wavefront", every pixel of an anti-diagonal i + j = d at once (H+W-1 steps,
    gathering their k×k patches), or "raster", one pixel at a time (H·W steps, a slice each).
    S is inverted once, a triangular solve against I. Inside, images are batch-last
    (G, H, W, C, B): a gathered patch (G, n, k, k, C, B) is already the matrix (k·k·C, B) of each
    pixel, so each step is two batched products with no copy to rearrange it (the einsum of an
    earlier pixel-major (G, H, W, B, C) form copied every patch: 0.21-0.23 s for the small finc
    model's 100 samples, against 0.17 s now). The diagonals' index tensors depend on H, W and k
    only and are made once per call.
    """
    G, B, C, H, W = y.shape
    k = w.shape[-1]
    y = y.permute(0, 3, 4, 2, 1)                      # (G, H, W, C, B)
    x = y.new_zeros(G, H + k - 1, W + k - 1, C, B)    # padded on the top and the left
    eye = torch.eye(C, dtype=w.dtype, device=w.device).expand(G, C, C)
    self_tap_inverse = torch.linalg.solve_triangular(w[..., k - 1, k - 1], eye, upper=upper)
    taps_matrix = w.permute(0, 1, 3, 4, 2).reshape(G, 1, C, k * k * C)   # [g, co, (a, b, ci)]
    solve_matrix = self_tap_inverse[:, None]

    def solve(patches, y_pixels):
        """patches (G, n, k, k, C, B), y_pixels (G, n, C, B) -> x at those n pixels."""
        n = patches.shape[1]
        r = y_pixels - taps_matrix @ patches.reshape(G, n, k * k * C, B)
        return solve_matrix @ r

    if order == "wavefront":
        taps = torch.arange(k, device=x.device)
        diagonals = []
        for d in range(H + W - 1):
            rows = torch.arange(max(0, d - W + 1), min(d, H - 1) + 1, device=x.device)
            cols = d - rows
            diagonals.append((rows, cols, rows[:, None, None] + taps[:, None],
                              cols[:, None, None] + taps))
        for rows, cols, patch_rows, patch_cols in diagonals:
            patches = x[:, patch_rows, patch_cols]
            x[:, rows + k - 1, cols + k - 1] = solve(patches, y[:, rows, cols])
    else:
        for i in range(H):
            for j in range(W):
                patch = x[:, None, i:i + k, j:j + k]
                x[:, i + k - 1, j + k - 1:j + k] = solve(patch, y[:, i, j:j + 1])
    return x[:, k - 1:, k - 1:].permute(0, 4, 3, 1, 2)


class MaskedConv(nn.Module):
    """The masked k×k invertible convolution on G channel groups, one padding corner each:
    nfcore's InvConv (G = 1, params "weight" (C, C, k, k), "log_diag" (C,), "bias" (C,)),
    FInCUnit (G = 4 corners, "weight" (4, C/4, C/4, k, k), "log_diag" (4, C/4)) and the
    published CInC conv (InvConv with an upper self-tap and a bias).

    Group g: F.conv2d(F.pad(x_g, its corner), W_eff flipped to that corner) (+ bias), where
    W_eff = weight ⊙ mask with the self-tap (a = b = k-1) [co, ci] lower triangular (or upper
    with ``self_tap="upper"``) and its diagonal 1 or exp(log_diag); logdet = H·W·Σ log_diag
    (0 without ``learn_diag``). Inverse: the bias subtracted, each group flipped into the
    top-left form, then ``solve_top_left`` over anti-diagonals ("wavefront") or pixels
    ("raster").
    """

    def __init__(self, channels, k, corners, learn_diag, inverse_order="wavefront",
                 self_tap="lower", bias=False):
        super().__init__()
        self.k, self.corners, self.G = k, tuple(corners), len(corners)
        Cg = channels // self.G
        shape = (self.G, Cg, Cg, k, k) if self.G > 1 else (Cg, Cg, k, k)
        self.weight = nn.Parameter(torch.zeros(shape))
        self.log_diag = nn.Parameter(torch.zeros(shape[:-3])) if learn_diag else None
        self.bias = nn.Parameter(torch.zeros(shape[:-3])) if bias else None
        self.inverse_order = inverse_order
        self.upper = self_tap == "upper"
        below_diagonal = torch.ones(Cg, Cg).tril(-1)
        mask = torch.ones(Cg, Cg, k, k)
        mask[:, :, k - 1, k - 1] = below_diagonal.T if self.upper else below_diagonal
        self_tap_eye = torch.zeros(Cg, Cg, k, k)
        self_tap_eye[:, :, k - 1, k - 1] = torch.eye(Cg)
        self.register_buffer("mask", mask)
        self.register_buffer("self_tap_eye", self_tap_eye)

    def effective_weight(self):
        """(G, Cg, Cg, k, k): weight ⊙ mask, the self-tap diagonal set to 1 or exp(log_diag)."""
        G, (Cg, k) = self.G, self.mask.shape[1:3]
        w = self.weight.reshape(G, Cg, Cg, k, k) * self.mask
        if self.log_diag is None:
            return w + self.self_tap_eye
        return w + self.self_tap_eye * self.log_diag.reshape(G, Cg).exp()[:, :, None, None, None]

    def logdet(self, x):
        B, _, H, W = x.shape
        if self.log_diag is None:
            return x.new_zeros(B)
        return (H * W * self.log_diag.sum()).expand(B)

    def forward(self, x):
        outputs = []
        for x_g, w_g, corner in zip(x.chunk(self.G, dim=1), self.effective_weight(), self.corners):
            pad, flips = corner_padding(corner, self.k)
            outputs.append(F.conv2d(F.pad(x_g, pad), w_g.flip(flips) if flips else w_g))
        y = torch.cat(outputs, dim=1)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y, self.logdet(x)

    def inverse(self, y):
        if self.bias is not None:
            y = y - self.bias.reshape(1, -1, 1, 1)
        flips = [corner_padding(corner, self.k)[1] for corner in self.corners]
        y_top_left = torch.stack([y_g.flip(f) if f else y_g
                                  for y_g, f in zip(y.chunk(self.G, dim=1), flips)])
        x = solve_top_left(y_top_left, self.effective_weight(), self.inverse_order, self.upper)
        return torch.cat([x_g.flip(f) if f else x_g for x_g, f in zip(x, flips)], dim=1)


class EmergingConv(nn.Module):
    """Emerging convolution as published: conv2(conv1(x)) + b, masked m×m convs with learned
    diagonals, conv1 bottom-right with a lower self-tap, conv2 top-left with an upper one and
    the bias (m = (k+1)/2 for nfcore's EmergingConv(k)); inverted pixel by pixel (raster), as
    nfcore does."""

    def __init__(self, channels, k):
        super().__init__()
        self.conv1 = MaskedConv(channels, k, ("bottom-right",), True, inverse_order="raster")
        self.conv2 = MaskedConv(channels, k, ("top-left",), True, inverse_order="raster",
                                self_tap="upper", bias=True)

    def forward(self, x):
        u, logdet1 = self.conv1(x)
        y, logdet2 = self.conv2(u)
        return y, logdet1 + logdet2

    def inverse(self, y):
        return self.conv1.inverse(self.conv2.inverse(y))


class Conv2dZero(nn.Conv2d):
    """Glow's zero-initialized last conv, 3×3 same padding: y = (conv(x) + bias) · exp(3·logs)."""

    def __init__(self, in_channels, out_channels):
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.logs = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x):
        return super().forward(x) * (LOGSCALE_FACTOR * self.logs).exp()[:, None, None]


class Network(nn.Module):
    """The coupling network: conv3×3 → ReLU → conv1×1 → ReLU → Conv2dZero 3×3, run in
    ``memory_format`` (channels-last by default: oneDNN's direct convolutions are 1.1-8× faster
    on it than on NCHW at the small model's shapes, see MEMORY_FORMAT)."""

    def __init__(self, in_channels, hidden, out_channels):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, 1)
        self.conv3 = Conv2dZero(hidden, out_channels)
        self.memory_format = torch.contiguous_format

    def forward(self, x):
        x = x.contiguous(memory_format=self.memory_format)
        return self.conv3(F.relu(self.conv2(F.relu(self.conv1(x), inplace=True)), inplace=True))


class Coupling(nn.Module):
    """Affine coupling on n channel blocks (affine: n = 2, network "nn"; quad: n = 4, "f1".."f3").
    Block k+1 (channels bounds[k] .. bounds[k+1]-1 of n, bounds[k] = k·C // n) from the blocks
    before it::

        shift, raw = f_k(x[:, :bounds[k]]).chunk(2)
        y_{k+1} = (x_{k+1} + shift) · sigmoid(raw + 2),    logdet += Σ log sigmoid(raw + 2)

    with log s = log sigmoid(raw + 2) squashed to −c·tanh(−log sigmoid(raw + 2) / c) when the
    layer has a ``scale_bound`` c.
    """

    def __init__(self, net_names, channels, hidden, scale_bound=None):
        super().__init__()
        self.scale_bound = scale_bound
        n = len(net_names) + 1
        self.bounds = [k * channels // n for k in range(n + 1)]
        self.net_names = tuple(net_names)
        for k, name in enumerate(self.net_names):
            size_in, size_out = self.bounds[k + 1], self.bounds[k + 2] - self.bounds[k + 1]
            self.add_module(name, Network(size_in, hidden, 2 * size_out))

    def blocks(self):
        """(network, lo, hi): the network that transforms channels lo .. hi-1 from x[:, :lo]."""
        for k, name in enumerate(self.net_names):
            yield getattr(self, name), self.bounds[k + 1], self.bounds[k + 2]

    def log_scale(self, raw):
        log_s = F.logsigmoid(raw + SCALE_SHIFT)
        if self.scale_bound is None:
            return log_s
        return -self.scale_bound * torch.tanh(-log_s / self.scale_bound)

    def forward(self, x):
        outputs, logdet = [x[:, :self.bounds[1]]], 0
        for net, lo, hi in self.blocks():
            shift, raw = net(x[:, :lo]).chunk(2, dim=1)
            log_s = self.log_scale(raw)
            outputs.append((x[:, lo:hi] + shift) * log_s.exp())
            logdet = logdet + log_s.sum(dim=(1, 2, 3))
        return torch.cat(outputs, dim=1), logdet

    def inverse(self, y):
        x = y[:, :self.bounds[1]]
        for net, lo, hi in self.blocks():          # x holds the blocks before lo, solved already
            shift, raw = net(x).chunk(2, dim=1)
            x = torch.cat([x, y[:, lo:hi] * (-self.log_scale(raw)).exp() - shift], dim=1)
        return x


def gaussian_log_prob(z, mean=0.0, logs=0.0):
    """(B,) log N(z; mean, exp(logs)²), summed over each sample's values."""
    logs = torch.as_tensor(logs, dtype=z.dtype, device=z.device)
    elementwise = -0.5 * (LOG_2PI + 2 * logs + (z - mean) ** 2 * (-2 * logs).exp())
    return elementwise.flatten(1).sum(dim=1)


class Split(nn.Module):
    """Keep z1 = x[:, :C//2], factor out z2 under N(mean, exp(logs)²), [mean, logs] = prior(z1)."""

    def __init__(self, channels):
        super().__init__()
        self.kept = channels // 2
        self.prior = Conv2dZero(self.kept, 2 * (channels - self.kept))

    def forward(self, x):
        """(z1, log p(z2 | z1) (B,), z2)."""
        z1, z2 = x[:, :self.kept], x[:, self.kept:]
        mean, logs = self.prior(z1).chunk(2, dim=1)
        return z1, gaussian_log_prob(z2, mean, logs), z2

    def inverse(self, z1, z2=None, temperature=1.0):
        """[z1, z2], z2 drawn as mean + temperature · exp(logs) · ε when not given."""
        if z2 is None:
            mean, logs = self.prior(z1).chunk(2, dim=1)
            z2 = mean + temperature * logs.exp() * torch.randn_like(mean)
        return torch.cat([z1, z2], dim=1)


class TwinFlow(nn.Module):
    """The flow: ``layers`` in nfcore's order, a standard normal on z_top.
    log p(x) = log N(z_top; 0, I) + Σ logdets (Splits' log p(z2 | z1) included)."""

    def __init__(self, layers, top_shape):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.top_shape = tuple(top_shape)

    def forward(self, x):
        """(z_top, logdet (B,), [z2 of each Split])."""
        h, logdet, split_latents = x, 0, []
        for layer in self.layers:
            if isinstance(layer, Split):
                h, layer_logdet, z2 = layer(h)
                split_latents.append(z2)
            else:
                h, layer_logdet = layer(h)
            logdet = logdet + layer_logdet
        return h, logdet, split_latents

    def log_prob(self, x):
        z, logdet, _ = self(x)
        return gaussian_log_prob(z) + logdet

    def bits_per_dim(self, x, n_bits):
        """(B,) (−log p(x) + D·n_bits·ln 2) / (D·ln 2), D = C·H·W."""
        D = x[0].numel()
        return (-self.log_prob(x) + D * n_bits * math.log(2)) / (D * math.log(2))

    def encode(self, x):
        z, _, split_latents = self(x)
        return split_latents + [z]

    def decode(self, latents):
        return self.inverse(latents[-1], split_latents=latents[:-1])

    def inverse(self, z_top, split_latents=None, temperature=1.0):
        given = list(split_latents) if split_latents is not None else None
        h = z_top
        for layer in reversed(self.layers):
            if isinstance(layer, Split):
                h = layer.inverse(h, given.pop() if given is not None else None, temperature)
            else:
                h = layer.inverse(h)
        return h

    def sample(self, n, temperature=1.0):
        param = next(self.parameters())
        z_top = temperature * torch.randn(n, *self.top_shape, dtype=param.dtype, device=param.device)
        return self.inverse(z_top, temperature=temperature)


# ---- from nfcore -------------------------------------------------------------------------------

def twin_layer(layer):
    """The torch layer of one nfcore layer, with its shapes (parameters copied afterwards)."""
    if isinstance(layer, nf.Squeeze):
        return Squeeze()
    if isinstance(layer, nf.ActNorm):
        if not layer.initialized:
            raise ValueError("an ActNorm of the flow is not initialized: run one forward pass of "
                             "the nfcore flow on data first, so that both share its initialization")
        return ActNorm(layer.channels)
    if isinstance(layer, nf.Conv1x1):
        return Conv1x1(layer.channels)
    if isinstance(layer, GroupedMaskedConv):
        return MaskedConv(layer.channels, layer.k, layer.corners, layer.learn_diag,
                          self_tap=layer.self_tap, bias=layer.has_bias)
    if isinstance(layer, nf.EmergingConv):
        return EmergingConv(layer.channels, layer.conv1.k)
    if isinstance(layer, nf.BlockCoupling):
        if layer.actnorm:
            raise ValueError("the twin's coupling networks have no ActNorm (Flow never uses it)")
        return Coupling(layer.net_names, layer.channels, layer.hidden, layer.scale_bound)
    if isinstance(layer, nf.Split):
        return Split(layer.channels)
    raise TypeError(f"no twin for the layer {type(layer).__name__}")


def from_nfcore(flow, dtype=torch.float32, device="cpu", memory_format=MEMORY_FORMAT):
    """A TwinFlow on ``device`` with every parameter and fixed state (Conv1x1's perm and
    sign_s) of ``flow`` (whose arrays may be NumPy or CuPy), its coupling networks in
    ``memory_format`` (a key of MEMORY_FORMATS): their inputs and 4-d weights."""
    twin = TwinFlow([twin_layer(layer) for layer in flow.layers], flow.top_shape).to(
        device=device, dtype=dtype)
    with torch.no_grad():
        for index, (layer, twin_layer_) in enumerate(zip(flow.layers, twin.layers)):
            params = dict(twin_layer_.named_parameters())
            if set(params) != set(layer.params):
                raise ValueError(f"layer {index} ({type(layer).__name__}): the twin has params "
                                 f"{sorted(params)}, nfcore {sorted(layer.params)}")
            for name, param in params.items():
                value = to_numpy(layer.params[name])
                if tuple(param.shape) != value.shape:
                    raise ValueError(f"layer {index} {name}: twin shape {tuple(param.shape)}, "
                                     f"nfcore {value.shape}")
                param.copy_(torch.from_numpy(value))
            if isinstance(layer, nf.Conv1x1):
                twin_layer_.perm.copy_(torch.from_numpy(to_numpy(layer.perm)))
                twin_layer_.sign_s.copy_(torch.from_numpy(to_numpy(layer.sign_s)))
    for module in twin.modules():
        if isinstance(module, Network):
            module.memory_format = MEMORY_FORMATS[memory_format]
            module.to(memory_format=MEMORY_FORMATS[memory_format])
    return twin


# ---- agreement -----------------------------------------------------------------------------------

def relative_error(actual, expected):
    """max |actual − expected| / max |expected| (the absolute error where expected is all 0)."""
    actual = actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else actual
    scale = float(np.abs(expected).max())
    return float(np.abs(actual - expected).max()) / (scale if scale > 0 else 1.0)


def agreement(invconv, coupling, dtype=np.float64, image_shape=(3, 8, 8), levels=2, steps=2,
              hidden=8, batch=4, seed=0, device="cpu", scale_bound=None):
    """Max relative errors of the twin against nfcore on one small model:
    {"log p", "latents", "gradients", "decode"}, and the parameter with the worst gradient.

    The model is initialized (ActNorm) on the batch, then every parameter gets N(0, 0.05²)
    added, so that the zero-initialized convs do not make most gradients trivially zero.
    device "cuda": nfcore on CuPy (its backend set to "gpu" meanwhile), the twin on CUDA.
    """
    dtype = np.dtype(dtype)
    with nfcore_backend(device):
        xp = default_array_module()
        flow = Flow(image_shape, levels, steps, hidden, invconv, coupling, k=3, seed=seed,
                    dtype=dtype, scale_bound=scale_bound)
        x = xp.asarray(synthetic_images(batch, image_shape, seed).astype(dtype))
        flow.forward(x)
        rng = np.random.default_rng(seed + 1)
        for layer in flow.layers:
            for param in layer.params.values():
                param[...] += xp.asarray(rng.standard_normal(param.shape) * 0.05)
        twin = from_nfcore(flow, TORCH_DTYPE[dtype], device)
        x_torch = torch.from_numpy(to_numpy(x)).to(device)

        log_p, latents = to_numpy(flow.log_prob(x)), flow.encode(x)
        for layer in flow.layers:
            layer.zero_grad()
        flow.loss_and_backward(x, N_BITS)
        decoded = to_numpy(flow.decode(latents))
        latents = [to_numpy(z) for z in latents]

    twin.zero_grad()
    twin.bits_per_dim(x_torch, N_BITS).mean().backward()
    with torch.no_grad():
        twin_log_p, twin_latents = twin.log_prob(x_torch), twin.encode(x_torch)
        twin_decoded = twin.decode([torch.from_numpy(z).to(device) for z in latents])

    gradient_errors = {f"{index}/{name}": relative_error(param.grad, to_numpy(layer.grads[name]))
                       for index, (layer, twin_layer_) in enumerate(zip(flow.layers, twin.layers))
                       for name, param in twin_layer_.named_parameters()}
    worst = max(gradient_errors, key=gradient_errors.get)
    errors = {"log p": relative_error(twin_log_p, log_p),
              "latents": max(relative_error(a, b) for a, b in zip(twin_latents, latents)),
              "gradients": gradient_errors[worst],
              "decode": relative_error(twin_decoded, decoded)}
    return errors, worst


def check_agreement(cases, dtypes=(np.float64, np.float32), device="cpu"):
    """Print the agreement of every (invconv, coupling) case in each dtype; True if all pass."""
    print(f"Agreement of the twin with nfcore (small models, {device}): "
          f"max |torch − nfcore| / max |nfcore|")
    print(f"{'dtype':>8} {'invconv':>9} {'coupling':>8} {'log p':>9} {'latents':>9} "
          f"{'gradients':>9} {'decode':>9}  result  (worst gradient)")
    passed, worst_of = True, {}
    for dtype in map(np.dtype, dtypes):
        for invconv, coupling in cases:
            errors, worst = agreement(invconv, coupling, dtype, device=device)
            ok = max(errors.values()) <= TOLERANCE[dtype]
            passed &= ok
            worst_of[dtype] = max(worst_of.get(dtype, 0.0), *errors.values())
            print(f"{dtype.name:>8} {invconv:>9} {coupling:>8} " +
                  " ".join(f"{errors[key]:9.1e}" for key in ("log p", "latents", "gradients", "decode")) +
                  f"  {'ok' if ok else 'FAIL':>6}  ({worst})", flush=True)
    for dtype, error in worst_of.items():
        print(f"{dtype.name}: worst {error:.1e}, tolerance {TOLERANCE[dtype]:.0e}")
    return passed


# ---- timing: each side in a process of its own (bench/flow_timing.py says why) ------------------

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def nfcore_backend(device):
    """nfcore's backend for the twin's ``device``: "gpu" (CuPy) for "cuda", "cpu" else;
    restored afterwards."""
    before = get_backend()
    set_backend("gpu" if device == "cuda" else "cpu")
    try:
        yield
    finally:
        set_backend(before)


def time_torch(preset, invconv, coupling, n_threads, sample, device="cpu",
               memory_format=MEMORY_FORMAT):
    """torch's side, in this process: the twin of ``make_flow``'s flow, the same step (forward,
    backward, clip_grad_norm_, Adam) and sampling on one thread; seconds as ``time_nfcore``.
    device "cuda": the twin on the GPU, each timed call waiting for it (torch.cuda.synchronize)."""
    flow, x = make_flow(preset, invconv, coupling)
    twin = from_nfcore(flow, torch.float32, device, memory_format)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    repeats, warm_up = repeats_of(preset)
    times = {}
    if sample:
        torch.set_num_threads(1)

        def draw():
            with torch.inference_mode():      # no autograd bookkeeping at all (not only no grad)
                twin.sample(N_SAMPLES, TEMPERATURE)
            sync()

        times["sample_s"] = best_time(draw, min(repeats, 3), warm_up)
    x_torch = torch.from_numpy(x).to(device)
    optimizer = torch.optim.Adam(twin.parameters(), lr=LR)

    def step():
        optimizer.zero_grad()
        twin.bits_per_dim(x_torch, N_BITS).mean().backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        sync()

    torch.set_num_threads(n_threads)
    times["step_s"] = best_time(step, repeats, warm_up)
    return times


def run_side(side, preset, invconv, coupling, n_threads, blas_threads, sample, device="cpu",
             memory_format=MEMORY_FORMAT):
    """Time one side in a fresh process (python -m bench.flow_timing for nfcore, this file's
    --torch-worker for torch): {"step_s", "sample_s"}."""
    if side == "nfcore":
        command = ["-m", "bench.flow_timing", preset, invconv, coupling, str(n_threads),
                   str(blas_threads)]
    else:
        command = ["-m", "bench.twin", "--torch-worker", "--preset", preset, "--invconv",
                   invconv, "--coupling", coupling, "--threads", str(n_threads),
                   "--memory-format", memory_format]
    command += ["--sample"] if sample else []
    command += ["--device", device] if device != "cpu" else []
    done = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"timing {side} {preset} {invconv} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def benchmark(preset, invconv, coupling, n_threads, blas_threads, rounds, sample=True,
              device="cpu", memory_format=MEMORY_FORMAT):
    """One row of the table: images/s of a training step and seconds to sample 100, both sides.
    The two sides take turns, ``rounds`` processes each (the machine's speed drifts by ±20%:
    taking turns exposes both to it alike); each figure is the median over the rounds, and each
    ratio the median of the rounds' paired ratios (nfcore's round r against torch's round r),
    with their range."""
    times = {"nfcore": [], "torch": []}
    for _ in range(1 if preset == "paper" else rounds):
        for side in ("nfcore", "torch"):
            times[side].append(run_side(side, preset, invconv, coupling, n_threads, blas_threads,
                                        sample, device, memory_format))
    batch = PRESETS[preset]["batch"]

    def series(side, name):
        return np.array([round_times[name] for round_times in times[side]])

    step_ratios = series("torch", "step_s") / series("nfcore", "step_s")   # nfcore speed / torch's
    row = {"preset": preset, "invconv": invconv, "rounds": len(times["nfcore"]),
           "nfcore_img_s": batch / float(np.median(series("nfcore", "step_s"))),
           "torch_img_s": batch / float(np.median(series("torch", "step_s"))),
           "step_ratio": float(np.median(step_ratios)),
           "step_ratio_range": (float(step_ratios.min()), float(step_ratios.max()))}
    if sample:
        sample_ratios = series("torch", "sample_s") / series("nfcore", "sample_s")
        row.update(nfcore_sample_s=float(np.median(series("nfcore", "sample_s"))),
                   torch_sample_s=float(np.median(series("torch", "sample_s"))),
                   sample_ratio=float(np.median(sample_ratios)),
                   sample_ratio_range=(float(sample_ratios.min()), float(sample_ratios.max())))
    return row


def print_table(rows, n_threads, blas_threads, device="cpu"):
    where = (f"{n_threads} threads, nfcore BLAS {blas_threads}" if device == "cpu"
             else "nfcore on CuPy, torch on CUDA")
    print(f"\nTraining step (float32, {where}): images/s; sampling 100 images at T=0.7"
          f"{' on one thread' if device == 'cpu' else ''}: s. Medians over the rounds; ratio: "
          f"nfcore speed / torch speed, the median of the paired rounds [their range].")
    print(f"{'preset':>6} {'invconv':>9} {'nfcore img/s':>12} {'torch img/s':>11} "
          f"{'ratio [range]':>18} {'nfcore sample s':>15} {'torch sample s':>14} {'ratio [range]':>18}")
    for r in rows:
        low, high = r["step_ratio_range"]
        line = (f"{r['preset']:>6} {r['invconv']:>9} {r['nfcore_img_s']:12.1f} "
                f"{r['torch_img_s']:11.1f} {r['step_ratio']:6.2f} [{low:.2f}-{high:.2f}]")
        if "nfcore_sample_s" in r:
            low, high = r["sample_ratio_range"]
            line += (f" {r['nfcore_sample_s']:15.3f} {r['torch_sample_s']:14.3f} "
                     f"{r['sample_ratio']:6.2f} [{low:.2f}-{high:.2f}]")
        print(line)
    by_kind = {r["invconv"]: r for r in rows if "nfcore_sample_s" in r}
    if "finc" in by_kind and "glow1x1" in by_kind:
        finc, glow = by_kind["finc"], by_kind["glow1x1"]
        print(f"sampling time finc / glow1x1: nfcore {finc['nfcore_sample_s'] / glow['nfcore_sample_s']:.2f}, "
              f"torch {finc['torch_sample_s'] / glow['torch_sample_s']:.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=PRESETS,
                        help="small: L=3 K=4 width 64 B=64; wide: L=3 K=2 width 512 B=16; "
                             "paper: L=3 K=32 width 512 B=64 (one step, one sampling run)")
    parser.add_argument("--invconv", nargs="+", default=["finc", "emerging", "glow1x1"],
                        choices=STEP_KINDS, help="step kinds to time (default: finc emerging glow1x1)")
    parser.add_argument("--coupling", default="affine", choices=COUPLINGS,
                        help="coupling of the timed models (default affine)")
    parser.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS,
                        help="threads of both sides for the training step (default: all cores)")
    parser.add_argument("--blas-threads", type=int, default=None,
                        help="threads of NumPy's BLAS on nfcore's side (default: --threads, "
                             "as train.run)")
    parser.add_argument("--no-sample", action="store_true", help="skip the sampling times")
    parser.add_argument("--rounds", type=int, default=5,
                        help="processes per side and row, taking turns; medians over them "
                             "(default 5; the paper preset: 1)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cpu (default), or cuda: nfcore on CuPy (the CUDA kernels) against "
                             "the twin on PyTorch CUDA, the agreement check included")
    parser.add_argument("--memory-format", default=MEMORY_FORMAT, choices=MEMORY_FORMATS,
                        help="the twin's coupling networks in channels-last (default: oneDNN's "
                             "fastest at these shapes) or contiguous NCHW (the twin before it)")
    parser.add_argument("--torch-worker", action="store_true",
                        help="internal: time torch's side of one row in this process, print JSON")
    parser.add_argument("--sample", action="store_true", help="internal, with --torch-worker")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check-only", action="store_true", help="the agreement check alone")
    group.add_argument("--skip-check", action="store_true", help="time without the check")
    args = parser.parse_args(argv)
    if args.blas_threads is None:
        args.blas_threads = args.threads
    if not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
        parser.error(f"--threads must lie in 1..{numba.config.NUMBA_NUM_THREADS}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a PyTorch built for CUDA that sees a GPU")
    if args.torch_worker:
        print(json.dumps(time_torch(args.preset, args.invconv[0], args.coupling, args.threads,
                                    args.sample, args.device, args.memory_format)))
        return 0

    if not args.skip_check:
        cases = [(invconv, coupling) for invconv in STEP_KINDS for coupling in COUPLINGS]
        if not check_agreement(cases, device=args.device):
            print("the twin and nfcore disagree: no timing", file=sys.stderr)
            return 1
        if args.check_only:
            return 0
    rows = []
    for invconv in args.invconv:
        rows.append(benchmark(args.preset, invconv, args.coupling, args.threads,
                              args.blas_threads, args.rounds, sample=not args.no_sample,
                              device=args.device, memory_format=args.memory_format))
        print(f"  {args.preset} {invconv}: done", flush=True)
    print_table(rows, args.threads, args.blas_threads, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
