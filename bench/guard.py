"""The conditioning guards with and without, same budget and seed: bits/dim, and the
reconstruction error at the training size and at 4× it.

    python bench/guard.py                     # digits (train.run) and a CIFAR-shaped synthetic set
    python bench/guard.py --steps 300 --synthetic-steps 200

Two guards, each switchable (nfcore/conditioning.py, nfcore/layers/coupling.py):
``--guard 4``, every 10 steps the off-centre taps of any masked convolution whose inverse
amplifies errors more than 10× at 4× the image size are scaled down; ``--scale-bound 1``, the
affine couplings' log-scale is squashed into [−1, 0], so that their inverse, which divides by
the scale, multiplies errors by at most e ≈ 2.7 on any input (the bound chosen by measurement:
on digits, bounds 1, 1.5, 2, 3, 5 gave 4×-enlarged errors 1.9e-5, 3.1e-5, 1.6e-4, 1.0e-3, 0.14).

digits: train.run on the embedded 8×8 digits (its defaults: L=2, K=8, width 64, 4 bits); test
bits/dim over the whole test set; recon = max |decode(encode(x)) − x| on 64 test images (1×),
on 32×32 images each a 4×4 grid of test digits ("4× tiled": what the model has seen, on a larger
canvas), and on the 64 test digits enlarged 4× by nearest neighbour ("4× enlarged": strokes 4×
thicker than any it has seen).

synthetic: 3×32×32 images of a stationary random field (white noise smoothed by a Gaussian of
2 pixels, channels mixed, 5 bits), so that 128×128 images of the same field are in the model's
distribution at 4× the size. A flow with L=3, K=4, width 32 trained by the same loop as
train.run (Adam, lr 1e-3, warm-up 50, batch 16, clipping 50), the guard every 10 steps.

synthetic, drifted: the same, but every FInC unit's off-centre taps are drawn N(0, 0.2²) right
after initialization (the drifted model of bench/stability.py, whose inverse is wrong from 32×32
on): what the masked-convolution guard is for, shown where it has something to do.

Columns: test bits/dim; recon at 1× and 4×; the largest inverse_gain of any masked convolution
at 4× the size; times the guard rescaled a layer; training seconds.
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np
import scipy.ndimage

from data import load_dataset, preprocess
from nfcore.conditioning import guard_conditioning, inverse_gain, masked_convs_with_sizes, round_trip_error
from bench.stability import draw_off_centre_taps
from nfcore.flow import Flow
from nfcore.layers import FInCUnit
from nfcore.optim import Adam
from train import run as train_run
from train.session import load_flow


def largest_gain(flow, scale=4):
    return max(inverse_gain(layer, (C, scale * H, scale * W)) for layer, (C, H, W) in
               masked_convs_with_sizes(flow))


def enlarge(images, factor):
    return np.repeat(np.repeat(images, factor, axis=2), factor, axis=3)


def tile(images, per_side, seed=0):
    """(n, C, per_side·H, per_side·W): the images laid out per_side × per_side, in a random order."""
    n = len(images) // per_side ** 2
    order = np.random.default_rng(seed).permutation(len(images))[:n * per_side ** 2]
    grid = images[order].reshape((n, per_side, per_side) + images.shape[1:])
    return np.concatenate([np.concatenate(list(row), axis=3) for row in grid.transpose(1, 2, 0, 3, 4, 5)],
                          axis=2)


GUARDS = {"off": [], "--guard 4": ["--guard", "4"], "--scale-bound 1": ["--scale-bound", "1"],
          "--guard 4 --scale-bound 1": ["--guard", "4", "--scale-bound", "1"]}


def digits_rows(steps):
    _, test = load_dataset("digits")
    inputs = {"1×": preprocess(test[:64], 4, np.random.default_rng(0)),
              "4× tiled": preprocess(tile(test, 4), 4, np.random.default_rng(0)),
              "4× enlarged": preprocess(enlarge(test[:64], 4), 4, np.random.default_rng(0))}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for index, (name, options) in enumerate(GUARDS.items()):
            out = os.path.join(folder, str(index))
            started = time.time()
            final = train_run.main(["--max-steps", str(steps), "--eval-every", "100000",
                                    "--sample-every", "100000", "--out", out] + options)
            seconds = time.time() - started
            flow, _, _ = load_flow(os.path.join(out, "checkpoint.h5"), weights="raw")
            with open(os.path.join(out, "metrics.jsonl")) as file:
                rescaled = sum(json.loads(line).get("guard_rescaled", 0) for line in file)
            recon = {key: round_trip_error(flow, x) for key, x in inputs.items()}
            rows.append(("digits 8×8", name, final["test_bpd"], recon, largest_gain(flow), rescaled,
                         seconds))
    return rows


def stationary_field(n, size, seed):
    """n uint8 images (n, 3, size, size) of one stationary random field (any size, same law)."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, 3, size, size))
    smooth = scipy.ndimage.gaussian_filter(noise, sigma=(0, 0, 2, 2), mode="wrap")
    mixed = np.einsum("dc,nchw->ndhw", np.array([[1.0, 0.6, 0.3], [0.6, 1.0, 0.6], [0.3, 0.6, 1.0]]),
                      smooth / smooth.std())
    return np.clip(128 + 40 * mixed, 0, 255).astype(np.uint8)


def synthetic_rows(steps, seed=0, batch=16, n_bits=5, drift=None, guards=GUARDS):
    train = stationary_field(512, 32, seed=1)
    test = stationary_field(64, 32, seed=2)
    inputs = {"1×": preprocess(test, n_bits, np.random.default_rng(0)),
              "4× same field": preprocess(stationary_field(8, 128, seed=3), n_bits, np.random.default_rng(0))}
    rows = []
    for name, options in guards.items():
        guard = 4 if "--guard" in options else None
        scale_bound = 1.0 if "--scale-bound" in options else None
        flow = Flow((3, 32, 32), levels=3, steps=4, hidden=32, seed=seed, scale_bound=scale_bound)
        flow.forward(preprocess(train[:batch], n_bits, np.random.default_rng([seed, 1, 0])))
        if drift is not None:                   # start from a drifted model (issue's σ = 0.2)
            rng = np.random.default_rng(seed)
            for layer in flow.layers:
                if isinstance(layer, FInCUnit):
                    draw_off_centre_taps(layer, drift, rng)
        optimizer = Adam(flow.layers, lr=1e-3, warmup_steps=50, max_grad_norm=50.0)
        rescaled, started = 0, time.time()
        for step in range(steps):
            order = np.random.default_rng([seed, 0, step]).choice(len(train), batch, replace=False)
            x = preprocess(train[order], n_bits, np.random.default_rng([seed, 1, step]))
            optimizer.zero_grad()
            flow.loss_and_backward(x, n_bits)
            optimizer.step()
            if guard and (step + 1) % 10 == 0:
                rescaled += guard_conditioning(flow, scale=guard)
        seconds = time.time() - started
        bpd = float(np.mean(flow.bits_per_dim(inputs["1×"], n_bits)))
        recon = {key: round_trip_error(flow, x) for key, x in inputs.items()}
        data = "synthetic 3×32×32" + (f", FInC taps N(0, {drift}²) at the start" if drift else "")
        rows.append((data, name, bpd, recon, largest_gain(flow), rescaled, seconds))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--steps", type=int, default=1150, help="digits training steps (1150 = its 50 epochs)")
    parser.add_argument("--synthetic-steps", type=int, default=300, help="synthetic training steps (300)")
    args = parser.parse_args()
    drifted = {name: GUARDS[name] for name in ("off", "--guard 4")}
    for rows in (digits_rows(args.steps), synthetic_rows(args.synthetic_steps),
                 synthetic_rows(args.synthetic_steps, drift=0.2, guards=drifted)):
        columns = list(rows[0][3])
        print("\n| data | guards | test bits/dim | " + " | ".join(f"recon {c}" for c in columns)
              + " | largest gain at 4× | rescaled | train s |")
        print("|---" * (len(columns) + 6) + "|")
        for data, name, bpd, recon, gain, rescaled, seconds in rows:
            print(f"| {data} | {name} | {bpd:.4f} | " + " | ".join(f"{recon[c]:.1e}" for c in columns)
                  + f" | {gain:.3g} | {rescaled} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
