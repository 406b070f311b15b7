"""Data-parallel training (train/distributed.py): measured here on CPU processes, projected at
the papers' scale on GPUs.

    python bench/scale.py                       # measure 1 and 2 processes, then the projection
    python bench/scale.py --projection-only     # the projection alone (no MPI needed)

**Measured.** One train step of the ``small`` preset of bench/flow_timing.py (3×32×32, L=3, K=4,
width 64, FInC + affine, global batch 64), run as train.run --distributed runs it: each rank
takes its rows of the global batch, one Allreduce of the flat gradient buffer, Adam. Settings,
taking turns for ``--rounds`` rounds (this machine's speed drifts from minute to minute):

    1 process,  2 threads    the whole machine in one process (train.run's default)
    1 process,  1 thread     one core
    2 processes, 1 thread    the whole machine as two ranks (mpiexec -n 2)

For each: images/s (global batch / median step time) and the Allreduce's share of a step
(median over steps of allreduce time / step time; with 2 ranks it includes the wait for the
slower rank, which is where imbalance shows). Also the Allreduce alone of a buffer the size of
the papers' model between 2 processes here (shared memory).

**Projected, not measured** (no GPU here): the papers' model (3×32×32, L=3, K=32, width 512;
parameters counted from nfcore's Flow), per-GPU batch 64, on 8 GPUs (one node, NVLink) and 64
GPUs (8 nodes). Compute per step from the model's multiply-adds (forward; training ≈ 3× it)
at an ASSUMED sustained rate (--gpu-tflops); the Allreduce from the ring model,
t = 2(N−1)/N · bytes / bus bandwidth + 2(N−1) · latency, at ASSUMED bandwidths (--nvlink-gbs
within a node, --network-gbs per GPU between nodes). Step time without overlap (compute +
Allreduce, what train.run does: the reduction follows the backward pass) and with perfect
overlap (the larger of the two).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):   # run as python bench/scale.py: the repository root, for bench.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: F401  (first, before NumPy: OpenBLAS's idle wait as the command lines set it)
import numpy as np

from bench.flow_timing import IMAGE_SHAPE, LR, MAX_GRAD_NORM, N_BITS, PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = ((1, 2), (1, 1), (2, 1))          # (processes, threads per process)
PAPER = dict(levels=3, steps=32, hidden=512)


# ---- measured: the worker each rank runs ------------------------------------------------------
def worker(preset, threads, steps):
    """Train steps as a rank of ``mpiexec -n N``; rank 0 prints one JSON line of timings."""
    import numba
    import threadpoolctl
    from nfcore.flow import Flow
    from nfcore.optim import Adam
    from data import preprocess_rows
    from train.distributed import (Communicator, GradientAllreduce, distributed_loss_and_backward,
                                   initialize_actnorms)

    numba.set_num_threads(threads)
    threadpoolctl.threadpool_limits(threads, user_api="blas")
    communicator = Communicator()
    settings = PRESETS[preset]
    batch = settings["batch"]
    lo, hi = communicator.rows(batch)
    images = np.random.default_rng(0).integers(0, 256, (batch,) + IMAGE_SHAPE, dtype=np.uint8)
    flow = Flow(IMAGE_SHAPE, levels=settings["levels"], steps=settings["steps"],
                hidden=settings["hidden"], invconv="finc", coupling="affine", seed=0)
    initialize_actnorms(flow, communicator, preprocess_rows(images[lo:hi], N_BITS, [0, 1, 0], lo))
    optimizer = Adam(flow.layers, lr=LR, max_grad_norm=MAX_GRAD_NORM)
    reducer = GradientAllreduce(flow.layers, communicator)
    step_seconds, shares = [], []
    for step in range(steps + 2):                # the first two compile and warm up
        x = preprocess_rows(images[lo:hi], N_BITS, [0, 1, step], lo)
        communicator.comm.Barrier()
        tick = time.perf_counter()
        optimizer.zero_grad()
        reducer.take_seconds()
        distributed_loss_and_backward(flow, x, N_BITS, batch, reducer)
        optimizer.step()
        seconds = time.perf_counter() - tick
        allreduce = reducer.take_seconds()
        # the slowest rank's step is the job's step
        seconds = float(communicator.comm.allreduce(seconds, op=communicator.MPI.MAX))
        if step >= 2:
            step_seconds.append(seconds)
            shares.append(allreduce / seconds)
    if communicator.is_root:
        median = float(np.median(step_seconds))
        print("RESULT " + json.dumps({
            "processes": communicator.size, "threads": threads, "step_ms": 1e3 * median,
            "images_per_s": batch / median, "allreduce_share": float(np.median(shares)),
            "buffer_bytes": int(reducer.buffer.nbytes)}), flush=True)


def allreduce_worker(n_values, repeats):
    """The Allreduce alone of n_values float32 between the ranks: rank 0 prints the median."""
    from train.distributed import Communicator
    communicator = Communicator()
    buffer = np.ones(n_values, dtype=np.float32)
    seconds = []
    for _ in range(repeats + 1):
        communicator.comm.Barrier()
        tick = time.perf_counter()
        communicator.sum_buffer(buffer)
        seconds.append(time.perf_counter() - tick)
    if communicator.is_root:
        print("RESULT " + json.dumps({"processes": communicator.size, "bytes": buffer.nbytes,
                                      "allreduce_ms": 1e3 * float(np.median(seconds[1:]))}),
              flush=True)


def mpiexec():
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.exists(beside) else "mpiexec"


def launch(processes, arguments, threads):
    """Run this file under ``mpiexec -n processes`` with ``arguments``; its RESULT as a dict."""
    environment = dict(os.environ, PYTHONPATH=ROOT, NUMBA_NUM_THREADS=str(threads))
    done = subprocess.run([mpiexec(), "-n", str(processes), sys.executable, os.path.abspath(__file__),
                           *arguments], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"error: mpiexec -n {processes} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(lines[-1][len("RESULT "):])


# ---- projected ---------------------------------------------------------------------------------
def paper_model():
    """(parameters, forward multiply-adds per image) of the papers' model on 3×32×32.

    Multiply-adds: every convolution of the coupling networks and Split priors (k²·C_in·C_out
    per pixel; their weights are what the count runs over), every 1×1 and k×k invertible
    convolution (C² or k²·C² per pixel), at the resolution of its level."""
    from nfcore.flow import Flow
    flow = Flow(IMAGE_SHAPE, **PAPER, invconv="finc", coupling="affine", seed=0)
    C, H, W = IMAGE_SHAPE
    pixels = H * W
    macs = 0
    for layer in flow.layers:
        name = type(layer).__name__
        if name == "Squeeze":
            pixels //= 4
        for param_name, param in layer.params.items():
            if param.ndim >= 2 and not param_name.endswith(("bias", "logs")):
                macs += param.size * pixels     # weight entries × output pixels
    return flow.n_params(), macs


def ring_allreduce_seconds(n, nbytes, bus_gbs, latency_s):
    return 2 * (n - 1) / n * nbytes / (bus_gbs * 1e9) + 2 * (n - 1) * latency_s


def projection(args):
    params, macs = paper_model()
    nbytes = 4 * (params + 1)                    # float32 gradients and the loss
    compute_s = 3 * 2 * macs * args.per_gpu_batch / (args.gpu_tflops * 1e12)
    rows = []
    for gpus, bandwidth, where in ((8, args.nvlink_gbs, "1 node, NVLink"),
                                   (64, args.network_gbs, "8 nodes, network")):
        allreduce_s = ring_allreduce_seconds(gpus, nbytes, bandwidth, args.latency_us * 1e-6)
        serial, overlapped = compute_s + allreduce_s, max(compute_s, allreduce_s)
        rows.append(dict(gpus=gpus, where=where, bus_gbs=bandwidth, allreduce_ms=1e3 * allreduce_s,
                         compute_ms=1e3 * compute_s, step_ms=1e3 * serial,
                         step_overlapped_ms=1e3 * overlapped,
                         images_per_s=gpus * args.per_gpu_batch / serial,
                         efficiency=compute_s / serial))
    return params, macs, nbytes, compute_s, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=PRESETS,
                        help="model measured here (bench/flow_timing.py's presets; default small)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (default 10)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of the three settings, taking turns (default 3)")
    parser.add_argument("--projection-only", action="store_true", help="skip the measurements")
    parser.add_argument("--per-gpu-batch", type=int, default=64,
                        help="projection: images per GPU per step (default 64)")
    parser.add_argument("--gpu-tflops", type=float, default=15.0,
                        help="projection, ASSUMED: sustained float32 TFLOP/s of nfcore's kernels "
                             "on one GPU (default 15; not measured, no GPU here)")
    parser.add_argument("--nvlink-gbs", type=float, default=300.0,
                        help="projection, ASSUMED: NCCL Allreduce bus bandwidth within an 8-GPU "
                             "NVLink node, GB/s (default 300)")
    parser.add_argument("--network-gbs", type=float, default=40.0,
                        help="projection, ASSUMED: bus bandwidth per GPU between nodes, GB/s "
                             "(default 40: one 400 Gb/s link per GPU at 80%%)")
    parser.add_argument("--latency-us", type=float, default=10.0,
                        help="projection, ASSUMED: latency per ring hop, µs (default 10)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--allreduce-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.preset, args.threads, args.steps)
    if args.allreduce_worker:
        return allreduce_worker(args.allreduce_worker, 10)

    params, macs, nbytes, compute_s, rows = projection(args)
    if not args.projection_only:
        settings = PRESETS[args.preset]
        print(f"Measured here: preset {args.preset} (3×32×32, L={settings['levels']}, "
              f"K={settings['steps']}, width {settings['hidden']}, global batch {settings['batch']}), "
              f"{args.steps} steps per run, {args.rounds} rounds taking turns; median of the rounds")
        results = {setting: [] for setting in SETTINGS}
        for _ in range(args.rounds):
            for processes, threads in SETTINGS:
                results[(processes, threads)].append(launch(
                    processes, ["--worker", "--preset", args.preset, "--threads", str(threads),
                                "--steps", str(args.steps)], threads))
        print("| processes × threads | step ms | images/s | Allreduce share of a step |")
        print("|---|---:|---:|---:|")
        for (processes, threads), runs in results.items():
            ms = [r["step_ms"] for r in runs]
            print(f"| {processes} × {threads} | {np.median(ms):.0f} ({min(ms):.0f}–{max(ms):.0f}) "
                  f"| {np.median([r['images_per_s'] for r in runs]):.0f} "
                  f"| {100 * np.median([r['allreduce_share'] for r in runs]):.1f}% |")
        print(f"gradient buffer: {runs[0]['buffer_bytes']:,} bytes")
        alone = launch(2, ["--allreduce-worker", str(params + 1)], 1)
        print(f"Allreduce alone, 2 processes here, the papers' buffer ({alone['bytes']:,} bytes): "
              f"{alone['allreduce_ms']:.1f} ms ({alone['bytes'] / alone['allreduce_ms'] / 1e6:.2f} GB/s)")
        print()
    print(f"PROJECTION (not measured): the papers' model, 3×32×32, L=3, K=32, width 512, FInC + "
          f"affine: {params:,} parameters, {macs / 1e9:.2f} G multiply-adds per image forward; "
          f"bytes per Allreduce {nbytes:,} (float32); per-GPU batch {args.per_gpu_batch}; compute "
          f"{1e3 * compute_s:.0f} ms per step at an assumed {args.gpu_tflops:g} TFLOP/s "
          f"(training ≈ 3× forward); ring Allreduce, {args.latency_us:g} µs per hop")
    print("| GPUs | where | assumed bus GB/s | Allreduce ms | compute ms | step ms (no overlap) "
          "| step ms (overlapped) | images/s | efficiency |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['gpus']} | {r['where']} | {r['bus_gbs']:g} | {r['allreduce_ms']:.1f} "
              f"| {r['compute_ms']:.0f} | {r['step_ms']:.0f} | {r['step_overlapped_ms']:.0f} "
              f"| {r['images_per_s']:,.0f} | {100 * r['efficiency']:.0f}% |")


if __name__ == "__main__":
    main()
