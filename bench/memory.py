"""Peak memory and step time of one training step against depth, with and without the
memory-saving mode (Flow.loss_and_backward(recompute=True), train.run --recompute).

    python bench/memory.py                          # K = 2, 4, 8, 16, 32; 3×32×32, L = 3
    python bench/memory.py --steps 2 8 --batch 16 --hidden 64

For each K (flow steps per level) and mode it builds a Flow (finc + affine, float32),
initializes its ActNorms, and runs one forward + backward (loss_and_backward, no optimizer):
- peak MiB: the most memory NumPy held during the step beyond what existed before it (the
  parameters and zeroed gradients), as tracemalloc counts it (NumPy reports its array
  allocations to tracemalloc; Numba's own temporaries inside a kernel are not counted);
- step s: the best of --repeats timed steps, without tracemalloc running.
"""
import argparse
import time
import tracemalloc

import numpy as np

from nfcore.flow import Flow


def measure(steps, recompute, args):
    flow = Flow((3, args.size, args.size), levels=args.levels, steps=steps, hidden=args.hidden,
                invconv="finc", coupling="affine", seed=0)
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (args.batch, 3, args.size, args.size))
    x = x.astype(np.float32)
    flow.forward(x, keep_caches=False)          # ActNorm initialization
    for layer in flow.layers:
        layer.zero_grad()
    flow.loss_and_backward(x, 8, recompute=recompute)   # compiles, warms up
    for layer in flow.layers:
        layer.release()
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        flow.loss_and_backward(x, 8, recompute=recompute)
        times.append(time.perf_counter() - started)
        for layer in flow.layers:
            layer.release()
    tracemalloc.start()
    try:
        flow.loss_and_backward(x, 8, recompute=recompute)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak / 2 ** 20, min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8, 16, 32],
                        help="values of K to measure")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--size", type=int, default=32, help="image size (3 channels)")
    parser.add_argument("--hidden", type=int, default=64, help="coupling network width")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"3x{args.size}x{args.size}, L={args.levels}, finc + affine, width {args.hidden}, "
          f"B={args.batch}, float32; one forward + backward")
    print("|  K | cached: peak MiB | step s | memory-saving: peak MiB | step s | peak ratio | time ratio |")
    print("|---:|-----------------:|-------:|------------------------:|-------:|-----------:|-----------:|")
    for steps in args.steps:
        cached, cached_time = measure(steps, False, args)
        saving, saving_time = measure(steps, True, args)
        print(f"| {steps:2d} | {cached:16.1f} | {cached_time:6.2f} | {saving:23.1f} | "
              f"{saving_time:6.2f} | {cached / saving:10.1f} | {saving_time / cached_time:10.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
