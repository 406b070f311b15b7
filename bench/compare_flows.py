"""The four flow steps side by side on one data set, same budget, same seed.

    python bench/compare_flows.py                      # digits, 1150 steps each (50 epochs)
    python bench/compare_flows.py --max-steps 300 --coupling quad

For each of finc, cinc, emerging and glow1x1 it trains with ``train.run`` (every other setting
equal), then reports the parameter count, training time, test bits/dim over the whole test
set, and the time to sample 100 images at temperature 0.7 on one CPU thread (as the CInC poster
measures sampling time).
Runs go to runs/compare/<invconv>-<coupling>.
"""
import argparse
import json
import os
import time

import numba
import numpy as np

from nfcore.flow import COUPLINGS, STEP_KINDS
from train import run
from train.session import load_flow


def sampling_time(checkpoint, n=100, repeats=3, temperature=0.7):
    """Best time to draw n samples at ``temperature`` with one Numba thread."""
    flow, meta, _ = load_flow(checkpoint)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        flow.sample(n, temperature, np.random.default_rng(0))      # compile / warm up
        times = []
        for repeat in range(repeats):
            start = time.perf_counter()
            flow.sample(n, temperature, np.random.default_rng(repeat))
            times.append(time.perf_counter() - start)
    finally:
        numba.set_num_threads(threads)
    return min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir")
    parser.add_argument("--max-steps", type=int, default=1150)
    parser.add_argument("--coupling", default="affine", choices=COUPLINGS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--invconv", nargs="+", default=list(STEP_KINDS), choices=STEP_KINDS)
    parser.add_argument("--out", default=os.path.join("runs", "compare"))
    parser.add_argument("extra", nargs=argparse.REMAINDER,
                        help="more train.run options after --, the same for every run")
    args = parser.parse_args(argv)
    extra = [a for a in args.extra if a != "--"]

    rows = []
    for invconv in args.invconv:
        out = os.path.join(args.out, f"{invconv}-{args.coupling}")
        command = ["--dataset", args.dataset, "--invconv", invconv, "--coupling", args.coupling,
                   "--max-steps", str(args.max_steps), "--seed", str(args.seed), "--out", out,
                   "--eval-every", str(10 ** 9), "--sample-every", str(10 ** 9)] + extra
        if args.data_dir:
            command += ["--data-dir", args.data_dir]
        print(f"== python -m train.run {' '.join(command)}", flush=True)
        final = run.main(command)
        final["sample100_s"] = sampling_time(os.path.join(out, "checkpoint.h5"))
        rows.append(final)

    print(f"\n{args.dataset}, {args.coupling} coupling, {args.max_steps} steps, seed {args.seed}")
    print(f"{'invconv':>9} {'params':>9} {'train s':>8} {'test bpd':>9} {'sample 100 (1 thread, T=0.7) s':>31}")
    for r in rows:
        print(f"{r['invconv']:>9} {r['n_params']:9,d} {r['train_time_s']:8.0f} {r['test_bpd']:9.4f} "
              f"{r['sample100_s']:31.3f}")
    with open(os.path.join(args.out, f"summary-{args.coupling}.json"), "w") as file:
        json.dump(rows, file, indent=2)


if __name__ == "__main__":
    main()
