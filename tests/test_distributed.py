"""Data-parallel training over MPI (train/distributed.py), on the CPU.

The MPI tests start ``mpiexec -n N`` child jobs and need mpi4py and an MPI launcher
(``pip install -e ".[mpi]"``); without them they are skipped, saying so.

Tolerances. The N-rank job sums N partial float32 gradients where one process sums the whole
batch at once, so the two agree to float32 rounding (measured: gradients 8e-8 to 3e-7 relative,
N = 2…4). Over 10 Adam steps the parameters as a whole stay within relative 1e-5 (measured
5e-8 to 1.1e-7). Single tensors that start at zero (the last convolution of each coupling
network, Conv2dZero) can differ by up to 2e-3 of their own tiny norm: Adam's first updates
are ≈ lr·sign(g), and where a gradient entry is ≈ 0 its sign is decided by the order of the
float32 sums, in one process as much as in N. Those entries are ~1e-5 in absolute value, so
the comparison is over all parameters together, as the criterion is stated.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from train.distributed import preprocess_rows, rows_of_rank
from data import preprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mpiexec():
    """The mpiexec next to this Python (a virtual environment's MPICH wheel), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.exists(beside) else shutil.which("mpiexec")


def _mpi_missing():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install -e \".[mpi]\")"
    if mpiexec() is None:
        return "no mpiexec found (pip install -e \".[mpi]\" brings MPICH's)"
    return None


needs_mpi = pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))


def run_mpi(n, arguments, timeout=180):
    """``mpiexec -n n python arguments...`` from the repository root, one thread per rank."""
    environment = dict(os.environ, PYTHONPATH=ROOT, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1",
                       OPENBLAS_NUM_THREADS="1")
    return subprocess.run([mpiexec(), "-n", str(n), sys.executable, *arguments], cwd=ROOT,
                          env=environment, capture_output=True, text=True, timeout=timeout)


def test_rows_of_rank_cover_the_batch():
    for batch_size in (1, 7, 30, 64):
        for size in (1, 2, 3, 4, 8):
            rows = [rows_of_rank(batch_size, rank, size) for rank in range(size)]
            assert rows[0][0] == 0 and rows[-1][1] == batch_size
            assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
            assert max(hi - lo for lo, hi in rows) - min(hi - lo for lo, hi in rows) <= 1


def test_preprocess_rows_equals_the_rows_of_the_whole_batch():
    images = np.random.default_rng(3).integers(0, 256, (9, 3, 4, 5), dtype=np.uint8)
    whole = preprocess(images, 5, np.random.default_rng([7, 1, 2]))
    for lo, hi in ((0, 4), (4, 9), (3, 4), (8, 9)):
        np.testing.assert_array_equal(preprocess_rows(images[lo:hi], 5, [7, 1, 2], lo), whole[lo:hi])


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_reproduce_one_process(ranks):
    """N ranks (2, and 3 for slices of unequal size) against one process on the same global
    batches: ActNorm's initialization, the first step's gradient, the losses and the parameters
    after 10 Adam steps, the sharded test bits/dim, and the ranks' parameters identical."""
    done = run_mpi(ranks, [os.path.join("tests", "distributed_worker.py")])
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["ranks"] == ranks
    assert result["actnorm_init_relative"] <= 1e-6, result
    assert result["gradient_relative"] <= 1e-5, result
    assert result["loss_relative"] <= 1e-5, result
    assert result["parameters_relative"] <= 1e-5, result
    assert result["eval_relative"] <= 1e-6, result


def test_actnorm_takes_its_statistics_from_moments_from():
    """ActNorm's own statistics are float64 mean and std; inside moments_from it takes the
    given function's (data-parallel training: the global batch's)."""
    from nfcore.layers import ActNorm
    from nfcore.layers.actnorm import channel_moments, moments_from
    x = np.random.default_rng(0).standard_normal((5, 3, 4, 4)).astype(np.float32) * 3 + 1
    mean, std = channel_moments(x)
    np.testing.assert_array_equal(mean, x.astype(np.float64).mean(axis=(0, 2, 3)).astype(np.float32))
    np.testing.assert_array_equal(std, x.astype(np.float64).std(axis=(0, 2, 3)).astype(np.float32))
    given = (np.array([1, 2, 3], np.float32), np.array([2, 4, 8], np.float32))
    layer = ActNorm()
    with moments_from(lambda h: given):
        layer.forward(x)
    np.testing.assert_allclose(layer.params["bias"], -given[0])
    np.testing.assert_allclose(layer.params["logs"], -np.log(given[1] + 1e-6), rtol=1e-6)
