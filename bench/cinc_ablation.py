"""Why `cinc` trails the other steps on digits: the published CInC step has no 1×1 convolution.

    python bench/cinc_ablation.py                    # 3 seeds, digits, the main job's settings

The published CInC step is ActNorm → CInC k×k conv → coupling; finc, emerging and glow1x1 all
have a learned 1×1 convolution (Glow's LU form) in their step, and glow1x1, which has nothing
else, matches finc on digits. This trains, with ``train.run`` and every setting of
bench/compare_flows.py (digits, L=2, K=8, width 64, 4 bits, 1150 steps, affine coupling), the
cinc step with a 1×1 convolution added after its ActNorm (ActNorm → Conv1x1 → CInC conv →
coupling), for each seed, and prints its test bits/dim beside the runs of compare_flows in
runs/compare (when they are there). The variant exists only here: ``nfcore.flow.flow_step`` is
replaced for the duration of each run, and its checkpoints hold one layer more than a `cinc`
config describes, so they are for this comparison only (under runs/cinc_ablation).
"""
import argparse
import json
import os
from unittest import mock

import numpy as np

import nfcore.flow
from nfcore.layers import Conv1x1
from train import run

ORIGINAL_STEP = nfcore.flow.flow_step


def cinc_with_1x1(invconv, coupling, channels, hidden, k, seed, dtype=np.float32, scale_bound=None):
    """The published cinc step with Glow's 1×1 convolution after its ActNorm."""
    layers = ORIGINAL_STEP(invconv, coupling, channels, hidden, k, seed, dtype, scale_bound)
    if invconv == "cinc":
        layers.insert(1, Conv1x1(channels, dtype=dtype, seed=seed + 1))
    return layers


def final_bpd(folder):
    path = os.path.join(folder, "final.json")
    if not os.path.isfile(path):
        return None
    with open(path) as file:
        return json.load(file)["test_bpd"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=1150)
    parser.add_argument("--out", default=os.path.join("runs", "cinc_ablation"))
    parser.add_argument("--compare", default=os.path.join("runs", "compare"),
                        help="bench/compare_flows.py's runs, shown beside (default runs/compare)")
    parser.add_argument("extra", nargs=argparse.REMAINDER,
                        help="more train.run options after --, as given to compare_flows")
    args = parser.parse_args(argv)
    extra = [a for a in args.extra if a != "--"]
    rows = {}
    for seed in args.seeds:
        out = os.path.join(args.out, f"cinc+1x1-affine-s{seed}")
        with mock.patch.object(nfcore.flow, "flow_step", cinc_with_1x1):
            final = run.main(["--invconv", "cinc", "--coupling", "affine", "--max-steps",
                              str(args.max_steps), "--seed", str(seed), "--out", out,
                              "--eval-every", str(10 ** 9), "--sample-every", str(10 ** 9)] + extra)
        rows[seed] = {"cinc + 1×1": final["test_bpd"]}
        for invconv in ("cinc", "finc", "emerging", "glow1x1"):
            rows[seed][invconv] = final_bpd(os.path.join(args.compare, f"{invconv}-affine-s{seed}"))
    columns = ["cinc", "cinc + 1×1", "finc", "emerging", "glow1x1"]
    print(f"\ndigits, affine coupling, {args.max_steps} steps: test bits/dim")
    print("| seed | " + " | ".join(columns) + " |")
    print("|---:|" + "---:|" * len(columns))
    for seed, row in rows.items():
        print(f"| {seed} | " + " | ".join("-" if row[c] is None else f"{row[c]:.4f}" for c in columns) + " |")
    means = [np.mean([row[c] for row in rows.values() if row[c] is not None] or [np.nan])
             for c in columns]
    print("| mean | " + " | ".join(f"{m:.4f}" for m in means) + " |")


if __name__ == "__main__":
    main()
