"""Benchmark of InvConv: forward, the wavefront inverse, and the baselines, side by side.

    python bench/invconv.py                 # CPU (Numba), B=64, C=12, k=3, float32
    python bench/invconv.py --sizes 16 32   # only some image sizes
    python bench/invconv.py --gpu           # the CUDA kernels on CuPy arrays

Every figure is the best of several runs, measured in this one process, so ratios compare like
with like. Columns:

    forward      the masked conv (InvConv.forward), and its rate in GFLOP/s (2·B·H·W·C²·k² flops)
    inverse      the wavefront solve (InvConv.inverse): H+W-1 sequential steps
    raster       the raster-scan solve (Emerging's way), same compiled kernel code: H·W steps,
                 parallel only over the batch
    np-wave / np-raster   the same two solves as NumPy loops, one vectorized step per
                 anti-diagonal / per pixel: the step-count ratio without compiled code
    backward     InvConv.backward (input and weight gradients)
    torch        with --torch: PyTorch's conv2d (oneDNN) on the same shape, a reference for the
                 forward's speed (torch is never a dependency of nfcore)

and, on a small case, the dense SciPy LU solve of the same system (one sample).
"""
import argparse
import importlib.util
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
    layer = nfcore.InvConv(k=k, channels=C, learn_diag=True, dtype=dtype, seed=0)
    rng = np.random.default_rng(0)
    layer.params["weight"][...] = xp.asarray(rng.standard_normal(layer.params["weight"].shape)
                                             * 0.3 / np.sqrt(k * k * C), dtype=dtype)
    return layer


def bench_size(B, C, H, k, xp, kernels, sync, numpy_loops, with_torch):
    dtype = np.float32
    layer = make_layer(C, k, xp, dtype)
    x = xp.asarray(np.random.default_rng(1).standard_normal((B, C, H, H)), dtype=dtype)
    y, _ = layer.forward(x)
    yg, wk = kernels.to_groups(y, layer._flips()), layer._kernel_weight(dtype)
    row = {"size": f"{H}x{H}"}

    t = best_time(lambda: layer.forward(x), 5, sync)
    row["forward"] = best_time(lambda: layer.forward(x), repeats_for(t), sync)
    row["gflops"] = 2 * B * H * H * C * C * k * k / row["forward"] / 1e9
    row["inverse"] = best_time(lambda: layer.inverse(y), repeats_for(row["forward"]), sync)
    row["raster"] = best_time(lambda: kernels.raster_inverse(yg, wk), repeats_for(row["inverse"], most=5), sync)
    row["backward"] = best_time(lambda: layer.backward(y, xp.ones(B, dtype)), repeats_for(row["forward"]), sync)
    torch_conv = torch_conv2d(B, C, H, k) if with_torch else None
    if torch_conv is not None:
        row["torch"] = best_time(torch_conv, repeats_for(row["forward"]))
    if numpy_loops:
        y_canonical = numpy_ref.to_groups(y, layer._flips())
        row["np_wave"] = best_time(lambda: numpy_ref.wavefront_inverse(y_canonical, wk), 2, sync)
        row["np_raster"] = best_time(lambda: numpy_ref.raster_inverse(y_canonical, wk), 1, sync)

    x_back = layer.inverse(y)
    row["error"] = float(abs(x_back - x).max() / abs(x).max())
    return row


def torch_conv2d(B, C, H, k):
    """A call of PyTorch's conv2d on the padded input (the same flops)."""
    import torch
    torch.set_num_threads(numba.get_num_threads())
    x = torch.randn(B, C, H + k - 1, H + k - 1)
    w = torch.randn(C, C, k, k)
    return lambda: torch.nn.functional.conv2d(x, w)


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
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--channels", type=int, default=12)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="image sizes (default 16 32 64 on the CPU, 32 64 on the GPU)")
    parser.add_argument("--no-numpy-loops", action="store_true",
                        help="skip the slow NumPy step loops (np-wave, np-raster)")
    parser.add_argument("--gpu", action="store_true", help="run the CUDA kernels on CuPy arrays")
    parser.add_argument("--torch", action="store_true",
                        help="add PyTorch's conv2d on the same shape (needs torch installed)")
    args = parser.parse_args(argv)

    if args.gpu:
        import cupy
        from nfcore.kernels import cuda as kernels
        xp, sync = cupy, cupy.cuda.get_current_stream().synchronize
        device = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
        sizes = args.sizes or [32, 64]
    else:
        from nfcore.kernels import cpu as kernels
        xp, sync = np, (lambda: None)
        device = f"CPU, {numba.get_num_threads()} Numba threads"
        sizes = args.sizes or [16, 32, 64]

    B, C, k = args.batch, args.channels, args.k
    numpy_loops = not args.no_numpy_loops and not args.gpu
    print(f"InvConv benchmark: B={B}, C={C}, k={k}, float32, {device}; best of several runs, ms")
    header = (f"{'size':>7} {'forward':>9} {'GF/s':>6} {'inverse':>9} {'inv/fwd':>8} "
              f"{'raster':>9} {'raster/inv':>10} {'backward':>9}")
    has_torch = args.torch and not args.gpu
    if has_torch and importlib.util.find_spec("torch") is None:
        parser.error("--torch needs PyTorch installed beside nfcore (pip install torch)")
    if has_torch:
        header += f" {'torch':>7} {'fwd/torch':>9}"
    if numpy_loops:
        header += f" {'np-wave':>9} {'np-raster':>10} {'ratio':>6}"
    print(header)
    for H in sizes:
        r = bench_size(B, C, H, k, xp, kernels, sync, numpy_loops, has_torch)
        line = (f"{r['size']:>7} {r['forward'] * 1e3:9.2f} {r['gflops']:6.1f} {r['inverse'] * 1e3:9.2f} "
                f"{r['inverse'] / r['forward']:8.2f} {r['raster'] * 1e3:9.2f} "
                f"{r['raster'] / r['inverse']:10.2f} {r['backward'] * 1e3:9.2f}")
        if has_torch:
            line += f" {r['torch'] * 1e3:7.2f} {r['forward'] / r['torch']:9.1f}"
        if numpy_loops:
            line += (f" {r['np_wave'] * 1e3:9.1f} {r['np_raster'] * 1e3:10.1f} "
                     f"{r['np_raster'] / r['np_wave']:6.1f}")
        print(line + f"   (inverse error {r['error']:.1e})", flush=True)

    print("\nDense solve of one sample, float64 (the system the wavefront solves), ms")
    print(f"{'size':>7} {'D':>6} {'dense LU':>10} {'wavefront':>10} {'ratio':>8}")
    for H in (8, 16):
        r = bench_dense(C, H, k, xp, sync, args.gpu)
        print(f"{r['size']:>7} {r['D']:6d} {r['dense'] * 1e3:10.2f} {r['wave'] * 1e3:10.3f} "
              f"{r['dense'] / r['wave']:8.0f}", flush=True)


if __name__ == "__main__":
    main()
