"""The share of layout conversions in a training step and in sampling: what one layout end to
end through the whole flow (issue 21, part 1: not built) could save at most.

    python bench/conversions.py                     # the small preset, finc emerging glow1x1
    python bench/conversions.py --preset wide --invconv finc

Every layer takes and returns NCHW (B, C, H, W). Two kinds of layer convert inside:
the masked convolutions to the kernels' batch-last grouped layout and back
(``kernels.cpu.to_groups`` / ``from_groups``) and the coupling networks to channel-last and back
(``nn.network.channel_last`` / ``channel_first``, also used by Split's prior). This script wraps those four functions with a
clock, runs the twin benchmark's model (bench/flow_timing.make_flow: float32, CIFAR-shaped
noise images) and prints, for a training step on 2 threads and for sampling 100 images on one
thread, the median wall time of a call and the share of it spent converting (median over
``--repeats`` calls, after one warm-up call). The clock's own cost is included in the share
(about a microsecond per conversion, a few hundred conversions per step).
"""
import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):   # run as python bench/conversions.py: the repository root, for bench.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: F401  (first, before NumPy: the command lines' thread settings)
import numpy as np

from bench.flow_timing import (LR, MAX_GRAD_NORM, N_BITS, N_SAMPLES, PRESETS, TEMPERATURE,
                               make_flow, numba_and_blas_threads)
from nfcore.flow import STEP_KINDS
from nfcore.kernels import cpu
from nfcore.layers import invconv, split
from nfcore.nn import network
from nfcore.optim import Adam

CONVERSIONS = [(cpu, "to_groups"), (cpu, "from_groups"), (network, "channel_last"),
               (network, "channel_first"), (split, "channel_last"), (split, "channel_first")]


class ConversionClock:
    """Wraps the conversion functions where the layers look them up; ``seconds`` sums their
    wall time since the last ``reset``."""

    def __init__(self):
        self.seconds = 0.0
        self._originals = []

    def __enter__(self):
        for module, name in CONVERSIONS:
            original = getattr(module, name)
            self._originals.append((module, name, original))
            setattr(module, name, self._timed(original))
        return self

    def __exit__(self, *exc):
        for module, name, original in self._originals:
            setattr(module, name, original)

    def _timed(self, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed

    def reset(self):
        self.seconds = 0.0


def shares(call, clock, repeats):
    """(median seconds of call(), median share of it spent in conversions)."""
    call()
    totals, parts = [], []
    for _ in range(repeats):
        clock.reset()
        start = time.perf_counter()
        call()
        totals.append(time.perf_counter() - start)
        parts.append(clock.seconds / totals[-1])
    return float(np.median(totals)), float(np.median(parts))


def measure(preset, invconv_kind, repeats):
    flow, x = make_flow(preset, invconv_kind, "affine")
    optimizer = Adam(flow.layers, lr=LR, max_grad_norm=MAX_GRAD_NORM)
    rng = np.random.default_rng(0)

    def step():
        optimizer.zero_grad()
        flow.loss_and_backward(x, N_BITS)
        optimizer.step()
        for layer in flow.layers:
            layer.release()

    with ConversionClock() as clock:
        with numba_and_blas_threads(1, 1):
            sample = shares(lambda: flow.sample(N_SAMPLES, TEMPERATURE, rng), clock, repeats)
        with numba_and_blas_threads(2, 2):
            train_step = shares(step, clock, repeats)
    return train_step, sample


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=PRESETS)
    parser.add_argument("--invconv", nargs="+", default=["finc", "emerging", "glow1x1"],
                        choices=STEP_KINDS)
    parser.add_argument("--repeats", type=int, default=9, help="timed calls of each (default 9)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    assert invconv.kernels.cpu is cpu          # the layers look the conversions up there
    print(f"Layout conversions, {args.preset} preset: median over {args.repeats} calls")
    print(f"{'step kind':>9} {'train step s':>12} {'converting':>10} {'sample 100 s':>12} "
          f"{'converting':>10}")
    for kind in args.invconv:
        (step_s, step_share), (sample_s, sample_share) = measure(args.preset, kind, args.repeats)
        print(f"{kind:>9} {step_s:12.4f} {step_share:10.1%} {sample_s:12.4f} {sample_share:10.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
