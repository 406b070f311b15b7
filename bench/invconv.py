"""Benchmark of InvConv: forward, the wavefront inverse, and the baselines, side by side.

    python bench/invconv.py                  # CPU (Numba), float32, the default shapes
    python bench/invconv.py --torch          # with PyTorch's conv2d beside it (the README table)
    python bench/invconv.py --shapes 64x12x16 --contention    # with one competing busy process
    python bench/invconv.py --gpu            # the CUDA kernels on CuPy arrays
    python bench/invconv.py --gpu --torch    # ... beside PyTorch's CUDA conv2d (cuDNN)

Shapes are BxCxH (batch, channels, image size H = W), k = 3 unless --k. Every call of a shape
is timed in turn, one turn each per round, for --rounds rounds (default 7) in this one process:
each figure is the median of its rounds, and each ratio the median [min-max] of the rounds' own
ratios (calls seconds apart, under the same load; the machine's speed drifts by ±20%).
Columns (ms):

    forward      InvConv.forward (layout conversion included), and its rate in GFLOP/s
                 (2·B·H·W·C²·k² flops: the masked entries counted as if they were computed)
    kernel       the forward kernel alone (cpu.conv_forward: register-blocked), and its rate
    plain        the plain CPU kernel (cpu.conv_forward_plain, every product added into
                 memory), and plain/kern, its time over the blocked kernel's
    inverse      InvConv.inverse, the schedule the kernels pick for the batch; inv/fwd, its
                 time over the forward's
    kern-inv     the wavefront inverse kernel alone (blocked); plain-inv the plain one
    diagonal     the kernel's anti-diagonal schedule (one barrier per anti-diagonal, H+W-1
                 parallel steps; what the inverse uses for small batches). On the GPU: one
                 kernel launch per anti-diagonal, against the inverse's one sweeping launch
    raster       the raster-scan solve (Emerging's way, H·W steps per image; on the CPU the
                 same schedule as the per-thread sweep)
    backward     InvConv.backward (input and weight gradients)
    finc         FInCUnit.forward at the same shape: four C/4 quarters, so a quarter of the
                 flops; finc GF/s is its rate, to compare with forward's
    torch        with --torch: PyTorch's conv2d (oneDNN; cuDNN with --gpu) on the same padded
                 shape, same threads; torch/fwd = torch time / forward time and torch/kern =
                 torch time / kernel time (> 1: nfcore faster)
    np-wave / np-raster   with --numpy-loops: the NumPy reference solves (one vectorized step per
                 anti-diagonal / per pixel), the step-count ratio without compiled code

--contention times the inverse (and PyTorch's conv with --torch) again while one other
process spins on a core: the slowdown it causes. A dense SciPy LU solve of one sample closes
the run (the system the wavefront solves).
"""
import argparse
import importlib.util
import subprocess
import sys
import time

import numba
import numpy as np
import scipy.linalg

import nfcore
from nfcore import reference
from nfcore.kernels import numpy_ref


def best_time(fn, repeats, sync=lambda: None):
    """The best wall time of ``repeats`` calls, after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def repeats_for(seconds_per_call, budget=1.0, most=20):
    return int(max(1, min(most, budget / max(seconds_per_call, 1e-6))))


def make_layer(C, k, xp, dtype):
    """An InvConv (C channels, learned diagonal) with its parameters on xp's device, weights
    N(0, (0.3/√(k²C))²). Sets nfcore's backend to that device (the FInC units built after it
    land there too)."""
    nfcore.set_backend("cpu" if xp is np else "gpu")
    layer = nfcore.InvConv(k=k, channels=C, learn_diag=True, dtype=dtype, seed=0)
    rng = np.random.default_rng(0)
    layer.params["weight"][...] = xp.asarray(rng.standard_normal(layer.params["weight"].shape)
                                             * 0.3 / np.sqrt(k * k * C), dtype=dtype)
    return layer


def alternate(calls, rounds, sync=lambda: None, turn_seconds=0.02):
    """Time the calls in turn, one turn each per round, for ``rounds`` rounds, after a warm-up
    call of each: {name: per-call seconds, one per round}. A call shorter than ``turn_seconds``
    is repeated within its turn (the same count every round). Ratios taken round by round
    compare calls timed seconds apart, under the same load."""
    repeats = {}
    for name, call in calls.items():
        call()
        sync()
        start = time.perf_counter()
        call()
        sync()
        repeats[name] = max(1, int(turn_seconds / max(time.perf_counter() - start, 1e-6)))
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(repeats[name]):
                call()
            sync()
            times[name].append((time.perf_counter() - start) / repeats[name])
    return {name: np.array(t) for name, t in times.items()}


def spread(values):
    """(median, min, max) of an array."""
    return float(np.median(values)), float(np.min(values)), float(np.max(values))


def bench_shape(B, C, H, k, xp, kernels, sync, numpy_loops, with_torch, rounds):
    dtype = np.float32
    layer = make_layer(C, k, xp, dtype)
    x = xp.asarray(np.random.default_rng(1).standard_normal((B, C, H, H)), dtype=dtype)
    y, _ = layer.forward(x)
    xg, yg = kernels.to_groups(x, layer._flips()), kernels.to_groups(y, layer._flips())
    wk = layer._kernel_weight(dtype)
    diagonal = kernels.diagonal_inverse if hasattr(kernels, "diagonal_inverse") \
        else kernels.wavefront_inverse_per_diagonal
    calls = {"forward": lambda: layer.forward(x),
             "kernel": lambda: kernels.conv_forward(xg, wk),
             "inverse": lambda: layer.inverse(y),
             "kernel_inverse": lambda: kernels.wavefront_inverse(yg, wk),
             "diagonal": lambda: diagonal(yg, wk),
             "raster": lambda: kernels.raster_inverse(yg, wk),
             "backward": lambda: layer.backward(y, xp.ones(B, dtype))}
    if hasattr(kernels, "conv_forward_plain"):          # the CPU's plain (unblocked) kernels
        calls["plain"] = lambda: kernels.conv_forward_plain(xg, wk)
        calls["plain_inverse"] = lambda: kernels.wavefront_inverse_plain(yg, wk)
    if C % 4 == 0:
        finc = nfcore.FInCUnit(k=k, channels=C, dtype=dtype, seed=0)
        calls["finc"] = lambda: finc.forward(x)
    if with_torch:
        device = "cpu" if xp is np else "cuda"
        calls["torch"] = torch_conv2d(B, C, H, k, device)
    times = alternate(calls, rounds, sync)

    flops = 2 * B * H * H * C * C * k * k
    row = {"shape": f"{B}x{C}x{H}", "flops": flops}
    row.update({name: float(np.median(t)) for name, t in times.items()})
    row["gflops"] = flops / row["forward"] / 1e9
    row["kernel_gflops"] = flops / row["kernel"] / 1e9
    row["inv_fwd"] = spread(times["inverse"] / times["forward"])
    if "plain" in times:
        row["plain_gflops"] = flops / row["plain"] / 1e9
        row["plain_kernel"] = spread(times["plain"] / times["kernel"])
        row["plain_inverse_ratio"] = spread(times["plain_inverse"] / times["kernel_inverse"])
    if "finc" in times:
        row["finc_gflops"] = flops / 4 / row["finc"] / 1e9
    if with_torch:
        row["torch_fwd"] = spread(times["torch"] / times["forward"])
        row["torch_kernel"] = spread(times["torch"] / times["kernel"])
    if numpy_loops:
        y_canonical = numpy_ref.to_groups(y, layer._flips())
        row["np_wave"] = best_time(lambda: numpy_ref.wavefront_inverse(y_canonical, wk), 2, sync)
        row["np_raster"] = best_time(lambda: numpy_ref.raster_inverse(y_canonical, wk), 1, sync)

    x_back = layer.inverse(y)
    row["error"] = float(abs(x_back - x).max() / abs(x).max())
    return row


def contention(B, C, H, k, with_torch):
    """(quiet, busy) best times of InvConv.inverse (and PyTorch's conv2d), without and with
    one other process spinning on a core."""
    layer = make_layer(C, k, np, np.float32)
    y = np.random.default_rng(1).standard_normal((B, C, H, H)).astype(np.float32)
    calls = {"inverse": lambda: layer.inverse(y)}
    if with_torch:
        calls["torch conv2d"] = torch_conv2d(B, C, H, k)
    quiet = {name: best_time(call, 20) for name, call in calls.items()}
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        busy = {name: best_time(call, 20) for name, call in calls.items()}
    finally:
        spinner.kill()
        spinner.wait()
    return quiet, busy


def fma_probe(seconds=0.2):
    """GFLOP/s of a loop of nothing but register-held float32 fused multiply-adds (8 blocks of
    64 bytes, cpu_blocked.block_fma on one L1-resident row), on all Numba threads: what the
    machine gives right now (its peak on a quiet machine), to read the kernels' rates against
    when the machine is shared."""
    from nfcore.kernels.cpu_blocked import fma_probe_kernel
    x, w = np.ones(16, np.float32), np.full(8, 1e-9, np.float32)
    threads = numba.get_num_threads()
    fma_probe_kernel(x, w, 10, threads)
    steps = 1000
    while True:
        start = time.perf_counter()
        fma_probe_kernel(x, w, steps, threads)
        elapsed = time.perf_counter() - start
        if elapsed > seconds / 4:
            break
        steps *= 4
    best = min(_timed(lambda: fma_probe_kernel(x, w, steps, threads)) for _ in range(3))
    return steps * threads * 8 * 16 * 2 / best / 1e9


def _timed(call):
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def torch_conv2d(B, C, H, k, device="cpu"):
    """A call of PyTorch's conv2d on the padded input (the same flops), float32, on ``device``
    ("cpu": as many threads as Numba; "cuda": cuDNN, its autotuner on)."""
    import torch
    torch.set_num_threads(numba.get_num_threads())
    torch.backends.cudnn.benchmark = True
    x = torch.randn(B, C, H + k - 1, H + k - 1, device=device)
    w = torch.randn(C, C, k, k, device=device)
    return lambda: torch.nn.functional.conv2d(x, w)


def torch_sync(device):
    """What waits for PyTorch's queued work on ``device`` (nothing on the CPU)."""
    if device == "cpu":
        return lambda: None
    import torch
    return torch.cuda.synchronize


def bench_dense(C, H, k, xp, sync, gpu):
    """One sample: the wavefront inverse against a dense LU solve of the (C·H·H)² system."""
    layer = make_layer(C, k, np, np.float64)
    y = np.random.default_rng(2).standard_normal((1, C, H, H))
    M = reference.masked_conv_matrix(layer, H, H)
    if gpu:
        import cupy
        M_gpu, y_gpu = cupy.asarray(M), cupy.asarray(y.ravel())
        dense = best_time(lambda: cupy.linalg.solve(M_gpu, y_gpu), 3, sync)
        layer = make_layer(C, k, cupy, np.float64)
        y_layer = cupy.asarray(y)
    else:
        dense = best_time(lambda: scipy.linalg.solve(M, y.ravel()), 3)
        y_layer = y
    wave = best_time(lambda: layer.inverse(y_layer), 20, sync)
    return {"D": C * H * H, "size": f"{H}x{H}", "dense": dense, "wave": wave}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--shapes", nargs="+", default=None, metavar="BxCxH",
                        help="batch x channels x image size (default 64x12x16 64x12x32 16x48x16 "
                             "64x12x64 on the CPU, 64x12x32 64x12x64 64x12x128 64x12x256 on the "
                             "GPU)")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7,
                        help="alternating rounds per shape (default 7; at least 5 recommended)")
    parser.add_argument("--numpy-loops", action="store_true",
                        help="add the slow NumPy step loops (np-wave, np-raster)")
    parser.add_argument("--gpu", action="store_true", help="run the CUDA kernels on CuPy arrays")
    parser.add_argument("--torch", action="store_true",
                        help="add PyTorch's conv2d on the same shape (needs torch installed; "
                             "with --gpu, torch built for CUDA)")
    parser.add_argument("--contention", action="store_true",
                        help="time the inverse again beside one busy process (first shape)")
    args = parser.parse_args(argv)

    if args.gpu:
        import cupy
        from nfcore.kernels import cuda as kernels
        xp, sync = cupy, cupy.cuda.get_current_stream().synchronize
        device = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
        shapes = args.shapes or ["64x12x32", "64x12x64", "64x12x128", "64x12x256"]
    else:
        from nfcore.kernels import cpu as kernels
        xp, sync = np, (lambda: None)
        device = f"CPU, {numba.get_num_threads()} Numba threads"
        shapes = args.shapes or ["64x12x16", "64x12x32", "16x48x16", "64x12x64"]
    try:
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in shapes]
        assert all(len(shape) == 3 and min(shape) > 0 for shape in shapes)
    except (ValueError, AssertionError):
        parser.error(f"--shapes takes BxCxH triples of positive integers, got {args.shapes}")

    k = args.k
    numpy_loops = args.numpy_loops and not args.gpu
    has_torch = args.torch
    if has_torch and importlib.util.find_spec("torch") is None:
        parser.error("--torch needs PyTorch installed beside nfcore (pip install -e '.[bench]')")
    if has_torch and args.gpu:
        import torch
        if not torch.cuda.is_available():
            parser.error("--gpu --torch needs a PyTorch built for CUDA that sees the GPU")
    print(f"InvConv benchmark: k={k}, float32, {device}; median of {args.rounds} alternating "
          f"rounds, ms (ratios: median [min-max] of the rounds' own ratios)")
    header = (f"{'BxCxH':>9} {'forward':>8} {'GF/s':>6} {'kernel':>7} {'GF/s':>6} {'plain':>7} "
              f"{'plain/kern':>16} {'inverse':>8} {'inv/fwd':>16} {'kern-inv':>8} "
              f"{'plain-inv':>9} {'diagonal':>8} {'raster':>7} {'backward':>8} {'finc':>7} "
              f"{'GF/s':>6}")
    if has_torch:
        header += f" {'torch':>7} {'torch/fwd':>16} {'torch/kern':>16}"
    if numpy_loops:
        header += f" {'np-wave':>9} {'np-raster':>10} {'ratio':>6}"
    print(header)

    def ratio(r):
        return f"{r[0]:5.2f} [{r[1]:4.2f}-{r[2]:4.2f}]"

    if not args.gpu:
        print(f"(FMA-only probe before the table: {fma_probe():.0f} GFLOP/s float32 on "
              f"{numba.get_num_threads()} threads)", flush=True)

    for B, C, H in shapes:
        r = bench_shape(B, C, H, k, xp, kernels, sync, numpy_loops, has_torch, args.rounds)
        finc = (f"{r['finc'] * 1e3:7.2f} {r['finc_gflops']:6.1f}" if "finc" in r
                else f"{'-':>7} {'-':>6}")
        plain = (f"{r['plain'] * 1e3:7.2f} {ratio(r['plain_kernel']):>16}" if "plain" in r
                 else f"{'-':>7} {'-':>16}")
        plain_inverse = f"{r['plain_inverse'] * 1e3:9.2f}" if "plain" in r else f"{'-':>9}"
        line = (f"{r['shape']:>9} {r['forward'] * 1e3:8.2f} {r['gflops']:6.1f} "
                f"{r['kernel'] * 1e3:7.2f} {r['kernel_gflops']:6.1f} {plain} "
                f"{r['inverse'] * 1e3:8.2f} {ratio(r['inv_fwd']):>16} "
                f"{r['kernel_inverse'] * 1e3:8.2f} {plain_inverse} "
                f"{r['diagonal'] * 1e3:8.2f} {r['raster'] * 1e3:7.2f} {r['backward'] * 1e3:8.2f} "
                + finc)
        if has_torch:
            line += (f" {r['torch'] * 1e3:7.2f} {ratio(r['torch_fwd']):>16} "
                     f"{ratio(r['torch_kernel']):>16}")
        if numpy_loops:
            line += (f" {r['np_wave'] * 1e3:9.1f} {r['np_raster'] * 1e3:10.1f} "
                     f"{r['np_raster'] / r['np_wave']:6.1f}")
        print(line + f"   (inverse error {r['error']:.1e})", flush=True)
    if not args.gpu:
        print(f"(FMA-only probe after the table: {fma_probe():.0f} GFLOP/s)", flush=True)

    if args.contention and not args.gpu:
        B, C, H = shapes[0]
        quiet, busy = contention(B, C, H, k, has_torch)
        print(f"\nBeside one busy process ({B}x{C}x{H}), ms: quiet, busy, slowdown")
        for name in quiet:
            print(f"{name:>14} {quiet[name] * 1e3:8.2f} {busy[name] * 1e3:8.2f} "
                  f"{busy[name] / quiet[name]:8.2f}x", flush=True)

    C = shapes[0][1]
    print("\nDense solve of one sample, float64 (the system the wavefront solves), ms")
    print(f"{'size':>7} {'D':>6} {'dense LU':>10} {'wavefront':>10} {'ratio':>8}")
    for H in (8, 16):
        r = bench_dense(C, H, k, xp, sync, args.gpu)
        print(f"{r['size']:>7} {r['D']:6d} {r['dense'] * 1e3:10.2f} {r['wave'] * 1e3:10.3f} "
              f"{r['dense'] / r['wave']:8.0f}", flush=True)


if __name__ == "__main__":
    main()
