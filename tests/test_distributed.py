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
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from train.distributed import rows_of_rank
from data import preprocess, preprocess_rows

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


ONE_THREAD = dict(PYTHONPATH=ROOT, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1",
                  OPENBLAS_NUM_THREADS="1")
# a small flow on digits: 10 steps, test bits/dim and a checkpoint at step 5
TINY = ["-m", "train.run", "--levels", "2", "--steps", "2", "--hidden", "16", "--batch-size", "32",
        "--max-steps", "10", "--eval-every", "5", "--sample-every", "1000", "--blas-threads", "1"]


def run_mpi(n, arguments, timeout=180):
    """``mpiexec -n n python arguments...`` from the repository root, one thread per rank."""
    return subprocess.run([mpiexec(), "-n", str(n), sys.executable, *arguments], cwd=ROOT,
                          env=dict(os.environ, **ONE_THREAD), capture_output=True, text=True,
                          timeout=timeout)


def run_mpmd(first, second, timeout=120):
    """Rank 0 runs ``python first...``, rank 1 ``python second...`` (mpiexec's MPMD form)."""
    return subprocess.run([mpiexec(), "-n", "1", sys.executable, *first, ":", "-n", "1",
                           sys.executable, *second], cwd=ROOT, env=dict(os.environ, **ONE_THREAD),
                          capture_output=True, text=True, timeout=timeout)


def parameters_of(path):
    from train.checkpoint import load_checkpoint
    arrays, meta = load_checkpoint(str(path))
    names = sorted(name for name in arrays if name.startswith("model/"))
    return np.concatenate([arrays[name].astype(np.float64).ravel() for name in names]), meta


def records(path):
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]


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
def test_ranks_reproduce_one_process():
    """3 ranks (slices of 10, 11 and 11 rows) against one process on the same global batches:
    ActNorm's initialization, the first step's gradient, the losses and the parameters after
    10 Adam steps, the sharded test bits/dim, the ranks' parameters identical, and a NaN in
    one rank's rows skipped by every rank (the worker asserts the last two)."""
    ranks = 3
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


@needs_mpi
def test_train_run_on_two_ranks_equals_one_process_and_resumes_on_three(tmp_path):
    """python -m train.run, 10 steps on one process, against mpiexec -n 2 ... --distributed for
    5 steps and its checkpoint resumed by 3 ranks for the other 5: the parameters after 10
    steps and the test bits/dim at steps 5 and 10 agree (relative 1e-5), and rank 0 alone
    wrote the outputs (each record once)."""
    one, many = tmp_path / "one", tmp_path / "many"
    done = subprocess.run([sys.executable, *TINY, "--out", str(one)], cwd=ROOT,
                          env=dict(os.environ, **ONE_THREAD), capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    done = run_mpi(2, [*TINY, "--distributed", "--max-steps", "5", "--out", str(many)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("test bits/dim:") == 1          # rank 0 alone prints
    done = run_mpi(3, [*TINY, "--distributed", "--resume", "--out", str(many)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(resumed at step 5), 3 ranks" in done.stdout

    expected, _ = parameters_of(one / "checkpoint.h5")
    got, meta = parameters_of(many / "checkpoint.h5")
    assert meta["step"] == 10
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) <= 1e-5
    tests_one = [(r["step"], r["test_bpd"]) for r in records(one / "metrics.jsonl") if "test_bpd" in r]
    tests_many = [(r["step"], r["test_bpd"]) for r in records(many / "metrics.jsonl") if "test_bpd" in r]
    assert [step for step, _ in tests_many] == [5, 10] == [step for step, _ in tests_one]
    for (_, a), (_, b) in zip(tests_many, tests_one):
        assert abs(a - b) / b <= 1e-5
    trained = [r for r in records(many / "metrics.jsonl") if "train_bpd" in r]
    assert [r["step"] for r in trained] == [5, 10] and all(r["allreduce_s"] >= 0 for r in trained)
    final = json.loads((many / "final.json").read_text())
    assert final["steps"] == 10 and abs(final["test_bpd"] - tests_one[-1][1]) / tests_one[-1][1] <= 1e-5


@needs_mpi
def test_ranks_with_different_options_end_the_job(tmp_path):
    """Two ranks started with different --seed: one line naming the difference, exit 1."""
    out = ["--out", str(tmp_path / "run"), "--distributed"]
    done = run_mpmd([*TINY, *out, "--seed", "0"], [*TINY, *out, "--seed", "1"])
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "differ in their config" in errors[0], done.stderr


@needs_mpi
def test_a_failing_rank_ends_the_job(tmp_path):
    """Rank 1 fails at start (its --resume names no file) while rank 0 goes on to the first
    collective: MPI_Abort ends both, naming rank 1 and its error, instead of a hang."""
    out = ["--out", str(tmp_path / "run"), "--distributed"]
    done = run_mpmd([*TINY, *out], [*TINY, *out, "--resume", str(tmp_path / "missing.h5")])
    assert done.returncode != 0
    assert "error: rank 1 of 2:" in done.stderr and done.stderr.count("no checkpoint") == 1, done.stderr


@needs_mpi
def test_a_killed_rank_ends_the_job(tmp_path):
    """SIGKILL to rank 1 in the middle of training: mpiexec ends rank 0 too."""
    out = tmp_path / "run"
    job = subprocess.Popen([mpiexec(), "-n", "2", sys.executable, *TINY, "--distributed",
                            "--max-steps", "1000000", "--eval-every", "1000000", "--out", str(out)],
                           cwd=ROOT, env=dict(os.environ, **ONE_THREAD), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        rank_1 = None
        for _ in range(600):                     # until training has started (rank 0 wrote)
            if (out / "metrics.jsonl").exists():
                rank_1 = _rank_pid(1, str(out))
                if rank_1 is not None:
                    break
            time.sleep(0.1)
        assert rank_1 is not None, "the job did not start"
        time.sleep(1.0)
        os.kill(rank_1, signal.SIGKILL)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode != 0


# where the launchers put a process's rank: MPICH (Hydra), Open MPI, PMIx-based launchers
RANK_VARIABLES = (b"PMI_RANK", b"OMPI_COMM_WORLD_RANK", b"PMIX_RANK")


def rank_from_environment(entries):
    """The MPI rank in a process's environment (``/proc/<pid>/environ`` split at NUL bytes),
    from the first of RANK_VARIABLES it holds; None when none."""
    values = dict(entry.split(b"=", 1) for entry in entries if b"=" in entry)
    for name in RANK_VARIABLES:
        if values.get(name, b"").isdigit():
            return int(values[name])
    return None


def test_the_rank_is_found_under_every_launchers_variable():
    assert rank_from_environment([b"PATH=/bin", b"PMI_RANK=1", b""]) == 1           # MPICH
    assert rank_from_environment([b"OMPI_COMM_WORLD_RANK=1", b"PMIX_RANK=1"]) == 1  # Open MPI
    assert rank_from_environment([b"PMIX_RANK=0"]) == 0
    assert rank_from_environment([b"PATH=/bin", b"RANK=1"]) is None


def _rank_pid(rank, marker):
    """The pid of the process of MPI rank ``rank`` whose command line holds ``marker``."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                command = file.read().decode(errors="replace")
            with open(f"/proc/{pid}/environ", "rb") as file:
                environment = file.read().split(b"\0")
        except OSError:
            continue
        if marker in command and "train.run" in command and rank_from_environment(environment) == rank:
            return int(pid)
    return None


def test_start_up_checks_say_what_to_change():
    from train.distributed import check_batch_size, check_gpus_per_machine
    check_batch_size(2, 2)
    with pytest.raises(ValueError, match="--batch-size 1 is split over 2 ranks.*--batch-size >= 2"):
        check_batch_size(1, 2)
    check_gpus_per_machine(1, 1)
    with pytest.raises(RuntimeError, match="2 ranks on this machine but 1 GPU.*at most 1 rank"):
        check_gpus_per_machine(2, 1)


def test_nccl_refuses_more_ranks_than_gpus_before_it_starts(monkeypatch):
    """NcclAllreduce with CuPy, NCCL and MPI faked: two ranks on a machine with one GPU fail
    with the start-up message before any device is chosen or NCCL communicator made."""
    import types
    from train import distributed

    touched = []
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1)
    cuda = types.ModuleType("cupy.cuda")
    cuda.runtime = runtime
    cuda.Device = lambda index: touched.append(("device", index))
    nccl = types.ModuleType("cupy.cuda.nccl")
    nccl.get_unique_id = lambda: touched.append("nccl")
    cuda.nccl = nccl
    cupy = types.ModuleType("cupy")
    cupy.cuda = cuda
    mpi = types.ModuleType("mpi4py")
    mpi.MPI = types.SimpleNamespace(COMM_TYPE_SHARED=1)
    for name, module in (("cupy", cupy), ("cupy.cuda", cuda), ("cupy.cuda.nccl", nccl),
                         ("mpi4py", mpi)):
        monkeypatch.setitem(sys.modules, name, module)
    local = types.SimpleNamespace(Get_rank=lambda: 1, Get_size=lambda: 2)
    comm = types.SimpleNamespace(Split_type=lambda kind: local, Get_rank=lambda: 1,
                                 Get_size=lambda: 2)
    with pytest.raises(RuntimeError, match="2 ranks on this machine but 1 GPU"):
        distributed.NcclAllreduce(comm)
    assert touched == []


@needs_mpi
def test_a_batch_smaller_than_the_ranks_is_refused_at_start_up(tmp_path):
    done = run_mpi(2, [*TINY, "--batch-size", "1", "--distributed", "--out", str(tmp_path / "r")])
    assert done.returncode != 0
    assert "--batch-size 1 is split over 2 ranks" in done.stderr, done.stderr
    assert "empty dimension" not in done.stderr


def test_an_expected_error_on_one_rank_ends_the_job_in_the_command_lines_words():
    """abort_on_error: a failure the command lines report in one line (an own check's
    ValueError) reaches MPI_Abort in the same words, without its type name; a bug (an error
    raised inside NumPy) keeps its type."""
    import numpy as np

    from train import cli, distributed

    class Communicator:
        aborted = None

        def abort(self, message, code=1):
            self.aborted = (message, code)

    communicator = Communicator()
    with distributed.abort_on_error(communicator):
        cli.limit_blas_threads(0)
    message, code = communicator.aborted
    assert code == 1 and not message.startswith("ValueError")
    try:
        cli.limit_blas_threads(0)
    except ValueError as error:
        assert message == str(error)
    with distributed.abort_on_error(communicator):
        np.zeros((2, 3)) + np.zeros((2, 4))
    assert communicator.aborted[0].startswith("ValueError: operands could not be broadcast")
