"""Sampling time against image size, for the four flow steps: the papers' sampling study.

    python bench/sampling.py                       # CPU (Numba), 16² 32² 64² 128², all four steps
    python bench/sampling.py --gpu                 # the same on CuPy and the CUDA kernels
    python bench/sampling.py --sizes 16 32 --n 4 --steps 2 --hidden 8     # a quick look
    python bench/sampling.py --plot docs/sampling.png          # also the figure (log-log)

The FInC paper times sampling on a GPU with a 2-block, 10-steps-per-block model as the image
grows from 16² to 128² (FInC 0.057 -> 0.572 s, Emerging 0.38 -> 24.07 s, CInC 0.12 -> 11.03 s,
MaCow 0.47 -> 2.62 s). Here: nfcore's Flow with L = --levels levels of K = --steps steps
(default 2 and 10, that model's depth), coupling width --hidden, affine coupling, k = 3,
3-channel images of each size, float32, ActNorm initialized on two noise images. The batch
size of the paper's figures is not stated in the sources this project has; --n sets it here.

Each cell is the best wall time of --repeats calls of ``Flow.sample(n, temperature=0.7)``
(after one warm-up call that compiles the kernels), the result brought to the host, in
seconds; at each size the models take turns, round after round. The inverses of the k×k steps
differ by how many sequential steps they take per image of H×W pixels: finc, the wavefront,
H+W−1; emerging, the raster scan, H·W, as published; glow1x1 has no k×k layer (its 1×1 inverse
is one matrix product). cinc is timed twice, the same model: "cinc (published, raster)" with the
raster scan its official code uses (``inverse_op_cython.pyx``: H·W steps), and "cinc (wavefront)"
with nfcore's wavefront solve. The ratio columns are each column's time over finc's.

--budget S: once one call of a step kind takes longer than S seconds, its larger sizes are
skipped (shown as "skip"): the table stays within a time limit whatever the machine.
"""
import argparse
import math
import sys
import time

import numba
import numpy as np

from nfcore.backend import to_numpy
from nfcore.flow import STEP_KINDS, Flow
from nfcore.layers import CInCConv

# FInC Flow (arXiv 2301.09266), GPU, seconds to sample, at 16² and 128² (only the ends are given)
PAPER_GPU_SECONDS = {"finc": (0.057, 0.572), "emerging": (0.38, 24.07), "cinc": (0.12, 11.03),
                     "macow": (0.47, 2.62)}


# the table's columns: (label, step kind, inverse method of its masked convolutions)
COLUMNS = {"finc": ("finc", "finc", "wavefront"),
           "cinc-raster": ("cinc (published, raster)", "cinc", "raster"),
           "cinc": ("cinc (wavefront)", "cinc", "wavefront"),
           "emerging": ("emerging", "emerging", "raster"),
           "glow1x1": ("glow1x1", "glow1x1", None)}


def columns_of(kinds):
    """The table's column keys for the step kinds asked for, in COLUMNS' order (cinc gives two)."""
    return [key for key, (_, kind, _) in COLUMNS.items() if kind in kinds]


def build_flow(column, size, levels, steps, hidden, xp):
    """A float32 Flow for (3, size, size) images, its ActNorms initialized on two noise images,
    its masked convolutions set to the column's inverse method (cinc's published raster scan,
    or the wavefront). Parameters live where ``nfcore.set_backend`` says (the GPU with --gpu)."""
    _, invconv, method = COLUMNS[column]
    flow = Flow((3, size, size), levels=levels, steps=steps, hidden=hidden, invconv=invconv,
                coupling="affine", k=3, seed=0, dtype=np.float32)
    if invconv == "cinc":
        for layer in flow.layers:
            if isinstance(layer, CInCConv):
                layer.inverse_method = method
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (2, 3, size, size)).astype(np.float32)
    flow.forward(xp.asarray(x))
    return flow


def plot(times, sizes, path, title):
    """The FInC paper's figure: sampling time against image size, log-log, one line a column."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4.2))
    for column, cells in times.items():
        measured = [size for size in sizes if size in cells]
        axes.plot(measured, [cells[size] for size in measured], marker="o",
                  label=COLUMNS[column][0])
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xticks(sizes, [f"{size}²" for size in sizes])
    axes.set_xlabel("image size (pixels)")
    axes.set_ylabel("sampling time (s)")
    axes.set_title(title, fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def time_sampling(flows, n, temperature, repeats, xp):
    """{kind: (best wall time in s, largest |value|)} of drawing n samples from each flow and
    bringing them to the host: one warm-up call each (it compiles the kernels), then
    ``repeats`` rounds in which the flows take turns, so that a change in the machine's load
    affects them alike. The largest |value| of the last sample is a sanity check: finite, and
    of the scale of images in [-0.5, 0.5]."""
    rng = np.random.default_rng(0)
    for flow in flows.values():
        to_numpy(flow.sample(n, temperature, rng, xp=xp))
    best = {kind: math.inf for kind in flows}
    largest = {}
    for _ in range(repeats):
        for kind, flow in flows.items():
            start = time.perf_counter()
            images = to_numpy(flow.sample(n, temperature, rng, xp=xp))
            best[kind] = min(best[kind], time.perf_counter() - start)
            largest[kind] = float(np.abs(images).max())
    return {kind: (best[kind], largest[kind]) for kind in flows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true",
                        help="sample on the GPU (CuPy arrays, the CUDA kernels)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128],
                        help="image sizes H = W (default 16 32 64 128)")
    parser.add_argument("--invconv", nargs="+", default=list(STEP_KINDS), choices=STEP_KINDS,
                        help="flow steps to time (default: all four)")
    parser.add_argument("--n", type=int, default=16, help="images per sample call (default 16)")
    parser.add_argument("--levels", type=int, default=2, help="L, levels (default 2)")
    parser.add_argument("--steps", type=int, default=10, help="K, steps per level (default 10)")
    parser.add_argument("--hidden", type=int, default=64,
                        help="width of the coupling networks (default 64)")
    parser.add_argument("--temperature", type=float, default=0.7, help="default 0.7")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed calls per cell, the best kept (default 3)")
    parser.add_argument("--budget", type=float, default=None, metavar="S",
                        help="skip a column's larger sizes once one call takes over S seconds")
    parser.add_argument("--plot", metavar="PNG", help="also draw the figure into this PNG file")
    args = parser.parse_args(argv)
    for size in args.sizes:
        if size <= 0 or size % 2 ** args.levels:
            parser.error(f"--sizes: {size} must be a positive multiple of 2^levels = "
                         f"{2 ** args.levels}")
    if min(args.n, args.levels, args.steps, args.hidden, args.repeats) < 1:
        parser.error("--n, --levels, --steps, --hidden and --repeats must be at least 1")

    if args.gpu:
        import nfcore
        nfcore.set_backend("gpu")
        import cupy as xp
        device = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)["name"].decode()
    else:
        xp = np
        device = f"CPU, {numba.get_num_threads()} Numba threads"
    print(f"Sampling time (s) of {args.n} images at T={args.temperature}, {device}: "
          f"L={args.levels}, K={args.steps}, width {args.hidden}, affine coupling, k=3, float32; "
          f"best of {args.repeats}", flush=True)

    times = {column: {} for column in columns_of(args.invconv)}
    for size in args.sizes:
        columns = [column for column, cells in times.items()
                   if not (cells and args.budget and max(cells.values()) > args.budget)]
        if not columns:
            break
        flows = {column: build_flow(column, size, args.levels, args.steps, args.hidden, xp)
                 for column in columns}
        results = time_sampling(flows, args.n, args.temperature, args.repeats, xp)
        for column, (seconds, largest) in results.items():
            print(f"  {COLUMNS[column][0]:>24} {size:>4}x{size:<4} {seconds:9.4f} s   "
                  f"(max |x| {largest:.2f})", flush=True)
            if not math.isfinite(largest):
                print(f"error: {column} at {size}x{size}: the samples hold NaN/Inf",
                      file=sys.stderr)
                return 1
            times[column][size] = seconds

    print()
    kinds = list(times)
    ratios = [kind for kind in kinds if kind != "finc"] if "finc" in kinds else []
    labels = [COLUMNS[kind][0] for kind in kinds]
    print("| size | " + " | ".join(labels) +
          "".join(f" | {COLUMNS[kind][0]} / finc" for kind in ratios) + " |")
    print("|---:|" + "---:|" * (len(kinds) + len(ratios)))
    for size in args.sizes:
        cells = [f"{times[kind][size]:.4f}" if size in times[kind] else "skip" for kind in kinds]
        for kind in ratios:
            both = size in times[kind] and size in times["finc"]
            cells.append(f"{times[kind][size] / times['finc'][size]:.2f}" if both else "-")
        print(f"| {size}×{size} | " + " | ".join(cells) + " |")
    first, last = args.sizes[0], args.sizes[-1]
    growth = [f"{COLUMNS[kind][0]} {times[kind][last] / times[kind][first]:.1f}×" for kind in kinds
              if first in times[kind] and last in times[kind]]
    if len(args.sizes) > 1 and growth:
        print(f"\nGrowth from {first}² to {last}²: " + ", ".join(growth) +
              " (the FInC paper, GPU, 16² to 128²: " +
              ", ".join(f"{kind} {b / a:.1f}×" for kind, (a, b) in PAPER_GPU_SECONDS.items()) + ")")
    if args.plot:
        plot(times, args.sizes, args.plot,
             f"{args.n} samples, T={args.temperature}, {device}; L={args.levels}, K={args.steps}, "
             f"width {args.hidden}")
        print(f"figure: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
