"""How the wavefront inverse's error grows with the weights and the image size, and what the
checks of nfcore.conditioning see. One command, every table:

    python bench/stability.py                 # the layer table, the measures, the whole model
    python bench/stability.py --check-cost    # also: the sample check's share of a sampling call

1. The layer table: ``InvConv(k=3, channels=12)`` with every tap but the self-tap drawn
   N(0, σ²) (seed 0), batch 2, x ~ N(0, 1): max |inverse(forward(x)) − x|, float32 and float64.
2. The measures at the same weights: ``conditioning.amplification`` (the round-trip error in
   units of ε·max|x|; flagged above AMPLIFICATION_LIMIT) and ``conditioning.inverse_gain``
   (max |M⁻¹v| / max |v|, float64).
3. The whole model: a 3×64×64 FInC flow (L=3, K=2, width 32) whose FInC units' off-centre taps
   are drawn N(0, σ²), ActNorm initialized on the batch: bits/dim of a random batch, max
   |decode(encode(x)) − x|, the largest value of 8 samples at T = 1 (unchecked), what the sample
   check says; and at σ = 0.6 the memory-saving gradients against the ordinary ones, unchecked,
   then what the memory-saving check says.
4. With --check-cost: a healthy model (σ = 0.05) sampling n = 8, 16, 64, 100 images with and
   without the sample check, the calls in turn: the check's share of the call.
"""
import argparse
import time

import numpy as np

from nfcore import InvConv
from nfcore.conditioning import (AMPLIFICATION_LIMIT, InverseAccuracyError, amplification, inverse_gain,
                                 random_input, round_trip_error)
from nfcore.flow import Flow
from nfcore.layers import FInCUnit, NonFiniteError

SIGMAS = (0.05, 0.1, 0.2)
COLUMNS = ((16, np.float32), (32, np.float32), (64, np.float32), (64, np.float64),
           (128, np.float32), (128, np.float64))


def draw_off_centre_taps(layer, sigma, rng):
    """Set every tap of a masked convolution but the self-tap to N(0, σ²) draws, in place."""
    weight = layer.params["weight"]
    k = layer.k
    self_tap = weight[..., k - 1, k - 1].copy()
    weight[...] = rng.standard_normal(weight.shape) * sigma
    weight[..., k - 1, k - 1] = self_tap


def noisy_invconv(sigma, dtype, seed=0):
    conv = InvConv(k=3, channels=12, dtype=dtype, seed=seed)
    draw_off_centre_taps(conv, sigma, np.random.default_rng(seed))
    return conv


def layer_tables():
    header = "| σ | " + " | ".join(f"{size} f{8 * np.dtype(dtype).itemsize}" for size, dtype in COLUMNS) + " |"
    rule = "|---" * (len(COLUMNS) + 1) + "|"
    print("max |inverse(forward(x)) − x|, InvConv(k=3, channels=12), batch 2, x ~ N(0, 1):\n")
    print(header + "\n" + rule)
    for sigma in SIGMAS:
        cells = []
        for size, dtype in COLUMNS:
            conv = noisy_invconv(sigma, dtype)
            x = random_input(conv, (12, size, size))
            cells.append(f"{round_trip_error(conv, x):.0e}")
        print(f"| {sigma} | " + " | ".join(cells) + " |")

    sizes = (16, 32, 64, 128)
    print(f"\nconditioning.amplification (float32; flagged * above {AMPLIFICATION_LIMIT:g}) and "
          f"inverse_gain (float64), same weights:\n")
    print("| σ | " + " | ".join(f"{s}: amplification | {s}: gain" for s in sizes) + " |")
    print("|---" * (2 * len(sizes) + 1) + "|")
    for sigma in SIGMAS:
        cells = []
        for size in sizes:
            a = amplification(noisy_invconv(sigma, np.float32), (12, size, size))
            g = inverse_gain(noisy_invconv(sigma, np.float64), (12, size, size))
            cells += [f"{a:.1e}" + (" *" if a > AMPLIFICATION_LIMIT else ""), f"{g:.1e}"]
        print(f"| {sigma} | " + " | ".join(cells) + " |")


def noisy_flow(sigma, seed=0, dtype=np.float32):
    flow = Flow((3, 64, 64), levels=3, steps=2, hidden=32, invconv="finc", seed=seed, dtype=dtype)
    x = random_input(flow, flow.image_shape, batch=2, seed=seed)
    flow.forward(x)                                  # ActNorm's data-dependent initialization
    rng = np.random.default_rng(seed)
    for layer in flow.layers:
        if isinstance(layer, FInCUnit):
            draw_off_centre_taps(layer, sigma, rng)
    return flow, x


def grads_of(flow, x, recompute, inverse_tolerance=None):
    for layer in flow.layers:
        layer.zero_grad()
    loss, _ = flow.loss_and_backward(x, 8, recompute=recompute, inverse_tolerance=inverse_tolerance)
    return loss, np.concatenate([g.ravel() for layer in flow.layers for g in layer.grads.values()])


def model_rows():
    print("\nA 3×64×64 FInC flow (L=3, K=2, width 32), FInC units' off-centre taps N(0, σ²), "
          "random batch of 2 in [−0.5, 0.5), float32:\n")
    print("| σ | bits/dim | max abs decode(encode(x)) − x | amplification | max abs sample, T=1 "
          "(unchecked) | max abs decode(encode(x')) − x', x' a sample | sample check: estimate |")
    print("|---|---|---|---|---|---|---|")
    for sigma in (0.05, 0.1, 0.2):
        flow, x = noisy_flow(sigma)
        bpd = float(np.mean(flow.bits_per_dim(x, 8)))
        error = round_trip_error(flow, x)
        a = amplification(flow, flow.image_shape)
        with np.errstate(over="ignore", invalid="ignore"):
            samples = flow.sample(8, 1.0, np.random.default_rng(1), tolerance=None)
            sample_round_trip = round_trip_error(flow, samples[:1])
        try:
            flow.sample(8, 1.0, np.random.default_rng(1))
            verdict = f"{flow.last_sample_error:.0e}, passes"
        except InverseAccuracyError:
            verdict = f"{flow.last_sample_error:.0e}, raises"
        print(f"| {sigma} | {bpd:.3f} | {error:.0e} | {a:.0e} | "
              f"{float(np.abs(samples).max()):.0e} | {sample_round_trip:.0e} | {verdict} |")

    print("\nMemory-saving backward (recompute=True) against the ordinary one, same model and batch:\n")
    print("| σ | loss | loss, recompute | max abs gradient difference / max abs gradient | recompute check |")
    print("|---|---|---|---|---|")
    for sigma in (0.05, 0.2, 0.3, 0.6):
        flow, x = noisy_flow(sigma)
        loss, g = grads_of(flow, x, recompute=False)
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                loss_r, g_r = grads_of(flow, x, recompute=True)
                relative = f"{float(np.abs(g_r - g).max() / np.abs(g).max()):.0e}"
            loss_r = f"{loss_r:.4f}"
        except NonFiniteError:
            loss_r, relative = "-", "NaN/Inf (stopped by the finiteness check)"
        try:
            grads_of(flow, x, recompute=True, inverse_tolerance=1e-3)
            verdict = "passes"
        except InverseAccuracyError as raised:
            verdict = "raises: " + str(raised).split(";")[0]
        print(f"| {sigma} | {loss:.4f} | {loss_r} | {relative} | {verdict} |")


def check_cost(sizes=(8, 16, 64, 100), rounds=15):
    print(f"\nThe sample check's cost: the healthy flow (σ = 0.05), n samples of 3×64×64 at T = 0.7, "
          f"{rounds} rounds of one call unchecked and one checked, in turn; the best times "
          f"(seconds) and the median over the rounds of the checked/unchecked ratio (paired calls "
          f"see the same machine, so the ratio is steadier than either time); and for comparison "
          f"a round trip decode(encode(x')) of one sample:\n")
    print("| n | unchecked | checked | check's share (median ratio − 1) | one-image round trip | its share |\n"
          "|---|---|---|---|---|---|")
    flow, _ = noisy_flow(0.05)

    def seconds(call):
        started = time.perf_counter()
        call()
        return time.perf_counter() - started

    for n in sizes:
        x = flow.sample(n, 0.7, np.random.default_rng(0), tolerance=None)
        unchecked = lambda: flow.sample(n, 0.7, np.random.default_rng(0), tolerance=None)
        checked = lambda: flow.sample(n, 0.7, np.random.default_rng(0), tolerance=1e-3)
        checked()
        times = np.array([(seconds(unchecked), seconds(checked)) for _ in range(rounds)])
        share = float(np.median(times[:, 1] / times[:, 0])) - 1
        round_trip = min(seconds(lambda: round_trip_error(flow, x[:1])) for _ in range(rounds))
        best = times.min(axis=0)
        print(f"| {n} | {best[0]:.3f} | {best[1]:.3f} | {100 * share:.1f}% | "
              f"{round_trip:.3f} | {100 * round_trip / best[0]:.1f}% |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--check-cost", action="store_true",
                        help="also time sampling with and without the sample check")
    args = parser.parse_args()
    layer_tables()
    model_rows()
    if args.check_cost:
        check_cost()


if __name__ == "__main__":
    main()
