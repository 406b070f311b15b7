"""nfcore's side of the twin benchmark (bench/twin.py): its models, data and timings, without torch.

    python -m bench.flow_timing small finc affine 2 2 --sample     # one JSON line: seconds
    python -m bench.flow_timing small finc affine 2 2 --device cuda   # nfcore on CuPy

bench/twin.py times each side in a process of its own, taking turns, and runs this module as
nfcore's. Why not both in one process: the two libraries then share ONE GNU OpenMP runtime.
libgomp's soname is libgomp.so.1 for both torch's bundled copy and the system's that Numba
links, so the dynamic loader gives the second library the copy the first one loaded, read with
the first one's settings. nfcore starts Numba's pool with a short spin (nfcore/threads.py:
GOMP_SPINCOUNT=1000, so that BLAS products after a kernel find the cores free); torch, imported
first, loads libgomp with the default long spin, and nfcore's steps then ran 1.5-4× slower
(66-154 img/s against 250-285 alone, small preset, 2 cores). Imported the other way round,
torch would run on nfcore's setting instead of its own. In separate processes each library runs
as its users run it.

This module never imports torch, so the libgomp it loads is the one nfcore sets up.
"""
import argparse
import contextlib
import json
import math
import sys
import time

import train  # noqa: F401  (first, before NumPy: OpenBLAS's idle wait as the command lines set it)
import numba
import numpy as np
import threadpoolctl

import nfcore
from data import preprocess
from nfcore.backend import default_array_module
from nfcore.flow import COUPLINGS, STEP_KINDS, Flow
from nfcore.optim import Adam

IMAGE_SHAPE = (3, 32, 32)        # CIFAR-10's
N_BITS = 8
MAX_GRAD_NORM = 50.0             # train.run's default clipping
LR = 1e-3
PRESETS = {   # image 3×32×32, L levels of K steps, coupling width, batch
    "small": dict(levels=3, steps=4, hidden=64, batch=64),
    "wide": dict(levels=3, steps=2, hidden=512, batch=16),
    "paper": dict(levels=3, steps=32, hidden=512, batch=64),
}
N_SAMPLES, TEMPERATURE = 100, 0.7


def synthetic_images(batch, image_shape, seed=0):
    """(batch, C, H, W) float32: uniform-noise 8-bit images, dequantized as train.run does."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch,) + tuple(image_shape), dtype=np.uint8)
    return preprocess(images, N_BITS, rng)


def make_flow(preset, invconv, coupling, device="cpu"):
    """The preset's float32 Flow, seeded, ActNorm initialized on the preset's batch x: (flow, x),
    x a NumPy array. Both sides of the twin build exactly this model from exactly these images.
    device "cuda": the flow on CuPy (nfcore's backend set to "gpu" in this process)."""
    config = PRESETS[preset]
    if device == "cuda":
        nfcore.set_backend("gpu")
    flow = Flow(IMAGE_SHAPE, config["levels"], config["steps"], config["hidden"], invconv,
                coupling, k=3, seed=0, dtype=np.float32)
    x = synthetic_images(config["batch"], IMAGE_SHAPE)
    flow.forward(default_array_module().asarray(x))   # ActNorm's data-dependent initialization
    return flow, x


def repeats_of(preset):
    """(timed repeats, warm-up call first?): the paper preset takes minutes per step, so one."""
    return (1, False) if preset == "paper" else (5, True)


def best_time(call, repeats, warm_up=True):
    """The best wall time of ``call`` over ``repeats`` calls, after one warm-up call."""
    if warm_up:
        call()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


@contextlib.contextmanager
def numba_and_blas_threads(n, blas_threads):
    """Numba on n threads, NumPy's BLAS on ``blas_threads``, restored afterwards."""
    numba_before = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        with threadpoolctl.threadpool_limits(blas_threads, user_api="blas"):
            yield
    finally:
        numba.set_num_threads(numba_before)


def time_nfcore(preset, invconv, coupling, n_threads, blas_threads, sample, device="cpu"):
    """{"step_s": one training step (forward, backward, clipped Adam), "sample_s": drawing
    N_SAMPLES images on one thread (when ``sample``)}, best of ``repeats_of(preset)``.
    Sampling first, on the initialized model: a few Adam steps on noise can make an untrained
    model's samples overflow. device "cuda": on CuPy, each timed call waiting for the GPU."""
    flow, x = make_flow(preset, invconv, coupling, device)
    xp = default_array_module()
    x = xp.asarray(x)
    if device == "cuda":
        sync = xp.cuda.get_current_stream().synchronize
    else:
        def sync():
            pass
    repeats, warm_up = repeats_of(preset)
    times = {}
    if sample:
        rng = np.random.default_rng(0)

        def draw():
            flow.sample(N_SAMPLES, TEMPERATURE, rng, xp=xp)
            sync()

        with numba_and_blas_threads(1, 1):
            times["sample_s"] = best_time(draw, min(repeats, 3), warm_up)
    optimizer = Adam(flow.layers, lr=LR, max_grad_norm=MAX_GRAD_NORM)

    def step():
        optimizer.zero_grad()
        flow.loss_and_backward(x, N_BITS)
        optimizer.step()
        for layer in flow.layers:                  # free the activations, as torch does
            layer.release()
        sync()

    with numba_and_blas_threads(n_threads, blas_threads):
        times["step_s"] = best_time(step, repeats, warm_up)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", choices=PRESETS)
    parser.add_argument("invconv", choices=STEP_KINDS)
    parser.add_argument("coupling", choices=COUPLINGS)
    parser.add_argument("threads", type=int)
    parser.add_argument("blas_threads", type=int)
    parser.add_argument("--sample", action="store_true", help="time sampling too")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cpu (default) or cuda (CuPy and the CUDA kernels)")
    args = parser.parse_args(argv)
    print(json.dumps(time_nfcore(args.preset, args.invconv, args.coupling, args.threads,
                                 args.blas_threads, args.sample, args.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
