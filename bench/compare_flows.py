"""The four flow steps side by side on one data set, same budget, same seeds.

    python bench/compare_flows.py                      # digits, 1150 steps each (50 epochs), seed 0
    python bench/compare_flows.py --seeds 0 1 2 --coupling affine quad    # the docs' table
    python bench/compare_flows.py --max-steps 300 --coupling quad
    python bench/compare_flows.py --seeds 0 1 2 --coupling affine quad --report-only
                                   # the table again from the runs' final.json (sampling re-timed)

For each of finc, cinc, emerging and glow1x1, each coupling and each seed it trains with
``train.run`` (every other setting equal), then reports the parameter count, training time,
test bits/dim over the whole test set, and the time to sample 100 images at temperature 0.7 on
one CPU thread (as the CInC poster measures sampling time). With several seeds each cell is
the mean ± half the range over the seeds.
Runs go to runs/compare/<invconv>-<coupling>-s<seed>.
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
    parser.add_argument("--coupling", nargs="+", default=["affine"], choices=COUPLINGS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--invconv", nargs="+", default=list(STEP_KINDS), choices=STEP_KINDS)
    parser.add_argument("--out", default=os.path.join("runs", "compare"))
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: the table from the runs in --out that have a "
                             "final.json (each model's sampling timed again)")
    parser.add_argument("extra", nargs=argparse.REMAINDER,
                        help="more train.run options after --, the same for every run")
    args = parser.parse_args(argv)
    extra = [a for a in args.extra if a != "--"]

    rows = []
    for coupling in args.coupling:
        for seed in args.seeds:
            for invconv in args.invconv:
                if not args.report_only:
                    rows.append(train_one(args, invconv, coupling, seed, extra))
                elif (row := trained_row(args, invconv, coupling, seed)) is not None:
                    rows.append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as file:
        json.dump(rows, file, indent=2)
    print_table(rows, args)


def train_one(args, invconv, coupling, seed, extra):
    """train.run one model, then time its sampling: its final.json with sample100_s added."""
    out = os.path.join(args.out, f"{invconv}-{coupling}-s{seed}")
    command = ["--dataset", args.dataset, "--invconv", invconv, "--coupling", coupling,
               "--max-steps", str(args.max_steps), "--seed", str(seed), "--out", out,
               "--eval-every", str(10 ** 9), "--sample-every", str(10 ** 9)] + extra
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    print(f"== python -m train.run {' '.join(command)}", flush=True)
    final = run.main(command)
    final["sample100_s"] = sampling_time(os.path.join(out, "checkpoint.h5"))
    final["seed"] = seed
    return final


def trained_row(args, invconv, coupling, seed):
    """A run's final.json with its sampling timed now; None (and a note) when it has none."""
    out = os.path.join(args.out, f"{invconv}-{coupling}-s{seed}")
    try:
        with open(os.path.join(out, "final.json")) as file:
            final = json.load(file)
    except FileNotFoundError:
        print(f"note: {out} has no final.json (not trained, or interrupted): left out")
        return None
    final["sample100_s"] = sampling_time(os.path.join(out, "checkpoint.h5"))
    final["seed"] = seed
    return final


def mean_spread(values, digits):
    """'mean ± half the range' (just the value for one seed)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {(values.max() - values.min()) / 2:.{digits}f}"


def print_table(rows, args):
    seeds = ", ".join(map(str, args.seeds))
    print(f"\n{args.dataset}, {args.max_steps} steps, seeds {seeds} (mean ± half the range)")
    print("| step | coupling | seeds | params | train s | test bpd | sample 100 (1 thread, T=0.7) s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for coupling in args.coupling:
        for invconv in args.invconv:
            cell = [r for r in rows if r["invconv"] == invconv and r["coupling"] == coupling]
            if not cell:
                continue
            print(f"| {invconv} | {coupling} | {len(cell)} | {cell[0]['n_params']:,} "
                  f"| {mean_spread([r['train_time_s'] for r in cell], 0)} "
                  f"| {mean_spread([r['test_bpd'] for r in cell], 4)} "
                  f"| {mean_spread([r['sample100_s'] for r in cell], 3)} |")


if __name__ == "__main__":
    main()
