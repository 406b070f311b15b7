"""The training-time conditioning guard (train.run --guard, nfcore.conditioning.guard_conditioning)
with and without, same budget and seed: bits/dim, and the reconstruction error at the training
size and at 4× it.

    python bench/guard.py                     # digits (train.run) and a CIFAR-shaped synthetic set
    python bench/guard.py --steps 300 --synthetic-steps 200

digits: train.run on the embedded 8×8 digits (its defaults: L=2, K=8, width 64, 4 bits), once
plainly and once with --guard 4; test bits/dim over the whole test set; recon_error =
max |decode(encode(x)) − x| on 64 test images, and at 32×32 on the same images enlarged 4×
(nearest neighbour: there are no 32×32 digits, so these are out of the model's distribution).

synthetic: 3×32×32 images of a stationary random field (white noise smoothed by a Gaussian of
2 pixels, channels mixed, 5 bits), so that 128×128 images of the same field are in the model's
distribution at 4× the size. A flow with L=3, K=4, width 32 trained by the same loop as
train.run (Adam, lr 1e-3, warm-up 50, batch 16, clipping 50), the guard every 10 steps.

Columns: test bits/dim; recon 1× and 4×; the largest inverse_gain of any masked convolution
at 4× the size; layers the guard rescaled; training seconds.
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
from nfcore.flow import Flow
from nfcore.optim import Adam
from train import run as train_run
from train.session import load_flow


def largest_gain(flow, scale=4):
    return max(inverse_gain(layer, (C, scale * H, scale * W)) for layer, (C, H, W) in
               masked_convs_with_sizes(flow))


def enlarge(images, factor):
    return np.repeat(np.repeat(images, factor, axis=2), factor, axis=3)


def digits_rows(steps):
    _, test = load_dataset("digits")
    x1 = preprocess(test[:64], 4, np.random.default_rng(0))
    x4 = preprocess(enlarge(test[:64], 4), 4, np.random.default_rng(0))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for guard in (None, 4):
            out = os.path.join(folder, f"guard{guard}")
            started = time.time()
            options = ["--max-steps", str(steps), "--eval-every", "100000", "--sample-every",
                       "100000", "--out", out] + (["--guard", str(guard)] if guard else [])
            final = train_run.main(options)
            seconds = time.time() - started
            flow, _, _ = load_flow(os.path.join(out, "checkpoint.h5"), weights="raw")
            with open(os.path.join(out, "metrics.jsonl")) as file:
                rescaled = sum(json.loads(line).get("guard_rescaled", 0) for line in file)
            rows.append(("digits 8×8", guard, final["test_bpd"], round_trip_error(flow, x1),
                         round_trip_error(flow, x4), largest_gain(flow), rescaled, seconds))
    return rows


def stationary_field(n, size, seed):
    """n uint8 images (n, 3, size, size) of one stationary random field (any size, same law)."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, 3, size, size))
    smooth = scipy.ndimage.gaussian_filter(noise, sigma=(0, 0, 2, 2), mode="wrap")
    mixed = np.einsum("dc,nchw->ndhw", np.array([[1.0, 0.6, 0.3], [0.6, 1.0, 0.6], [0.3, 0.6, 1.0]]),
                      smooth / smooth.std())
    return np.clip(128 + 40 * mixed, 0, 255).astype(np.uint8)


def synthetic_rows(steps, seed=0, batch=16, n_bits=5):
    train = stationary_field(512, 32, seed=1)
    test = stationary_field(64, 32, seed=2)
    x1 = preprocess(test, n_bits, np.random.default_rng(0))
    x4 = preprocess(stationary_field(8, 128, seed=3), n_bits, np.random.default_rng(0))
    rows = []
    for guard in (None, 4):
        flow = Flow((3, 32, 32), levels=3, steps=4, hidden=32, seed=seed)
        flow.forward(preprocess(train[:batch], n_bits, np.random.default_rng([seed, 1, 0])))
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
        bpd = float(np.mean(flow.bits_per_dim(x1, n_bits)))
        rows.append(("synthetic 3×32×32", guard, bpd, round_trip_error(flow, x1),
                     round_trip_error(flow, x4), largest_gain(flow), rescaled, seconds))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--steps", type=int, default=1150, help="digits training steps (1150 = its 50 epochs)")
    parser.add_argument("--synthetic-steps", type=int, default=300, help="synthetic training steps (300)")
    args = parser.parse_args()
    rows = digits_rows(args.steps) + synthetic_rows(args.synthetic_steps)
    print("\n| data | guard | test bits/dim | recon 1× | recon 4× | largest gain at 4× | rescaled | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, guard, bpd, r1, r4, gain, rescaled, seconds in rows:
        print(f"| {name} | {'--guard 4' if guard else 'off'} | {bpd:.4f} | {r1:.1e} | {r4:.1e} | "
              f"{gain:.2f} | {rescaled} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
