"""Training on the GPU against the CPU: the same model, the same steps, the same numbers.

    python bench/gpu_train.py OUT_DIR                    # digits and a CIFAR-shaped set
    python bench/gpu_train.py OUT_DIR --quick            # digits only, fewer steps
    python bench/gpu_train.py OUT_DIR --against cpu      # a rehearsal with no GPU: CPU vs CPU

Two checks, each printed as a table:

1. One training step of a whole flow, for every step kind (finc, cinc, emerging, glow1x1),
   float64 and float32: the same parameters and batch on NumPy and on CuPy; the largest
   difference of the loss, of the top latent and of every parameter gradient, each relative to
   the largest value of the NumPy side's array. Tolerances: 1e-10 (float64), 1e-4 (float32).
2. ``python -m train.run`` (run in this process, its --out under OUT_DIR) with --backend cpu and
   with --backend gpu, the same seed and steps: on digits, and on a CIFAR-shaped set (3×32×32
   noise images written as PNG files, read by --dataset folder). The logged train bits/dim (the
   mean of every 10 steps) and the final test bits/dim must agree to 1e-4 relative: the two
   devices round differently (sums in other orders, cuBLAS against OpenBLAS), and training
   carries such differences along; measured on the CPU, a 1e-7 relative change of the first
   digits batch moved the loss of each of the next 20 steps (train.run's digits settings) by
   at most 4.2e-8 relative, so 1e-4 leaves a wide margin for rounding and little room for a
   wrong kernel. Images/s is the last logged window's (the first includes compiling the
   kernels). CuPy's memory pool is reported after the GPU run: what it holds is reused from
   step to step.

Exit status 1 if any check fails. ``--against cpu`` runs the same code with NumPy on both sides
(the CUDA-less rehearsal: everything but the GPU itself).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
from PIL import Image

import nfcore
from nfcore.backend import to_numpy
from nfcore.flow import STEP_KINDS, Flow

TOLERANCE = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}
TRAIN_TOLERANCE = 1e-4
N_BITS = 8


def relative_error(actual, expected):
    """max |actual − expected| / max |expected| (absolute where expected is all zero)."""
    actual, expected = to_numpy(actual).astype(np.float64), to_numpy(expected).astype(np.float64)
    scale = float(np.abs(expected).max())
    return float(np.abs(actual - expected).max()) / (scale if scale > 0 else 1.0)


def one_step(invconv, dtype, backend, params=None):
    """(loss, z_top, {key: gradient}, params) of one loss_and_backward of a small 3×16×16 flow
    built on ``backend``; ``params`` (NumPy, from a first call) replaces its parameters."""
    nfcore.set_backend(backend)
    xp = nfcore.backend.default_array_module()
    flow = Flow((3, 16, 16), levels=2, steps=2, hidden=16, invconv=invconv, coupling="affine",
                k=3, seed=0, dtype=dtype)
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.uniform(-0.5, 0.5, (4, 3, 16, 16)), dtype=dtype)
    flow.forward(x)                                    # ActNorm's initialization
    if params is None:                                 # perturbed, so no gradient is trivial
        params = {f"{index}/{name}": to_numpy(p) + rng.standard_normal(p.shape).astype(dtype) * 0.05
                  for index, layer in enumerate(flow.layers) for name, p in layer.params.items()}
    for index, layer in enumerate(flow.layers):
        for name in layer.params:
            layer.params[name][...] = xp.asarray(params[f"{index}/{name}"])
        layer.zero_grad()
    loss, _ = flow.loss_and_backward(x, N_BITS)
    z, _ = flow.forward(x)
    grads = {f"{index}/{name}": g for index, layer in enumerate(flow.layers)
             for name, g in layer.grads.items()}
    return loss, z, grads, params


def check_one_step(against):
    """Table 1; True when every case is within tolerance."""
    print(f"1. One training step, cpu against {against}: max |{against} − cpu| / max |cpu|")
    print(f"{'dtype':>8} {'invconv':>9} {'loss':>9} {'z_top':>9} {'gradients':>9}  result  "
          f"(worst gradient)")
    passed = True
    for dtype in map(np.dtype, (np.float64, np.float32)):
        for invconv in STEP_KINDS:
            loss, z, grads, params = one_step(invconv, dtype, "cpu")
            loss_b, z_b, grads_b, _ = one_step(invconv, dtype, against, params)
            errors = {key: relative_error(grads_b[key], grads[key]) for key in grads}
            worst = max(errors, key=errors.get)
            row = [abs(loss_b - loss) / abs(loss), relative_error(z_b, z), errors[worst]]
            ok = max(row) <= TOLERANCE[dtype]
            passed &= ok
            print(f"{dtype.name:>8} {invconv:>9} " + " ".join(f"{e:9.1e}" for e in row) +
                  f"  {'ok' if ok else 'FAIL':>6}  ({worst})", flush=True)
    nfcore.set_backend("cpu")
    return passed


def write_cifar_shaped(folder, n_images=160):
    """n_images 3×32×32 PNG files of smooth random colours (a learnable noise), seeded."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(n_images):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((32, 32), Image.BILINEAR)
        image.save(os.path.join(folder, f"{index:04d}.png"))
    return folder


def train_run(argv):
    """python -m train.run with ``argv``, in this process; its metrics.jsonl records."""
    from train.run import main as train_main
    train_main(argv)
    out = argv[argv.index("--out") + 1]
    with open(os.path.join(out, "metrics.jsonl")) as file:
        return [json.loads(line) for line in file if line.strip()]


def check_training(out_dir, against, quick):
    """Table 2; True when every run's bits/dim agree."""
    runs = {"digits": ["--dataset", "digits", "--max-steps", "10" if quick else "20",
                       "--batch-size", "32"]}
    if not quick:
        folder = write_cifar_shaped(os.path.join(out_dir, "cifar_shaped_images"))
        runs["cifar-shaped"] = ["--dataset", "folder", "--data-dir", folder, "--image-size", "32",
                                "--levels", "3", "--steps", "4", "--hidden", "64", "--n-bits", "8",
                                "--batch-size", "16", "--max-steps", "10"]
    passed, lines = True, []
    for name, argv in runs.items():
        records = []
        for side, backend in (("reference", "cpu"), ("compared", against)):
            out = os.path.join(out_dir, f"train_{name}_{side}_{backend}")
            print(f"python -m train.run {' '.join(argv)} --backend {backend} --out {out}", flush=True)
            start = time.perf_counter()
            records.append((train_run(argv + ["--backend", backend, "--out", out, "--seed", "0"]),
                            time.perf_counter() - start))
            if backend == "gpu":
                import cupy
                pool = cupy.get_default_memory_pool()
                print(f"  CuPy memory pool after the run: {pool.used_bytes() / 2**20:.1f} MiB in "
                      f"use, {pool.total_bytes() / 2**20:.1f} MiB held", flush=True)
        (cpu, cpu_s), (other, other_s) = records
        train = [(a["step"], a["train_bpd"], b["train_bpd"]) for a, b in
                 zip([r for r in cpu if "train_bpd" in r], [r for r in other if "train_bpd" in r])]
        test = [r["test_bpd"] for r in cpu if "test_bpd" in r][-1], \
            [r["test_bpd"] for r in other if "test_bpd" in r][-1]
        speed = [[r["images_per_s"] for r in rs if "images_per_s" in r][-1] for rs in (cpu, other)]
        diffs = [abs(b - a) / abs(a) for _, a, b in train] + [abs(test[1] - test[0]) / abs(test[0])]
        ok = bool(train) and max(diffs) <= TRAIN_TOLERANCE
        passed &= ok
        for step, a, b in train:
            lines.append(f"| {name} | train, step {step} | {a:.5f} | {b:.5f} | {abs(b - a) / abs(a):.1e} | |")
        lines.append(f"| {name} | test | {test[0]:.5f} | {test[1]:.5f} | {diffs[-1]:.1e} | "
                     f"{'ok' if ok else 'FAIL'} |")
        lines.append(f"| {name} | images/s (last 10 steps) | {speed[0]:.0f} | {speed[1]:.0f} | "
                     f"{against}/cpu {speed[1] / speed[0]:.2f}× | |")
        lines.append(f"| {name} | run, s (all included) | {cpu_s:.1f} | {other_s:.1f} | | |")
    print(f"\n2. train.run, --backend cpu against --backend {against}, bits/dim (relative "
          f"tolerance {TRAIN_TOLERANCE:.0e})")
    print(f"| data | what | cpu | {against} | relative difference | result |")
    print("|---|---|---:|---:|---:|---|")
    print("\n".join(lines), flush=True)
    return passed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder for the runs' outputs (made if missing)")
    parser.add_argument("--quick", action="store_true",
                        help="digits only, 10 steps (the CIFAR-shaped runs left out)")
    parser.add_argument("--against", default="gpu", choices=("gpu", "cpu"),
                        help="the backend compared with the CPU (default gpu; cpu: a rehearsal)")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    passed = check_one_step(args.against)
    print(flush=True)
    passed &= check_training(args.out_dir, args.against, args.quick)
    if not passed:
        print("error: the CPU and the " + args.against.upper() + " disagree (see FAIL above)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
