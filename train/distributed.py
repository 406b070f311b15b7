"""Data-parallel training over MPI: N processes (ranks), one replica of the model each.

    mpiexec -n 4 python -m train.run --distributed [options]          # 4 processes, CPU
    mpiexec -n 8 python -m train.run --distributed --backend gpu       # one GPU per rank, NCCL

The run is the same function of the seed whatever N is:

- **Global batch.** ``--batch-size B`` is the global batch. The batch of step s is the one a
  single process would train on (data.Batches: its images and its dequantization noise are a
  function of (seed, s)); rank r takes its rows [lo_r, hi_r), lo_r = ⌊r·B/N⌋, and draws only
  their noise (the generator is advanced past the rows before its own, see ``preprocess_rows``).
- **Gradients.** Rank r's loss is the mean bits/dim of its B_r rows, so the global batch's
  gradient is the weighted sum  g = Σ_r (B_r/B)·g_r.  Each rank writes (B_r/B)·g_r, every
  parameter's gradient one after the other, into ONE flat buffer (its last entry: (B_r/B)·loss_r)
  and a single Allreduce(sum) per step gives every rank g and the global loss. Every rank then
  makes the same Adam update from the same g, and the replicas stay identical. A rank whose
  forward pass fails (NaN/Inf) writes NaN: the sum is NaN on every rank, so all skip the step
  together, as one process would.
- **ActNorm.** Its data-dependent initialization takes the global batch's mean and std per
  channel: Σx and then Σ(x − mean)² are summed over the ranks (float64), so every rank starts
  with the parameters a one-process run gets from the whole batch.
- **Evaluation** splits every test batch the same way; the ranks' sums of bits/dim are added.
- **I/O.** Rank 0 alone writes checkpoints, metrics, samples, config.json and final.json, and
  prints progress. A checkpoint holds no trace of N: ``--resume`` works with any N (every rank
  reads it, so --out must be on a file system all ranks see, or the file copied to each).
- **Consistency.** At start-up the ranks compare digests of the code (every .py file of
  nfcore/, train/ and data/), of the config, and, once the model is initialized or loaded, of
  every parameter and layer state; the parameter digests are compared again at each
  checkpoint. A difference ends the job naming the ranks that differ.
- **Failure.** An exception on any rank calls MPI_Abort, which ends every rank: otherwise the
  others would wait forever in their next Allreduce. A rank killed outright (a signal, the
  out-of-memory killer) is noticed by mpiexec, which ends the others.

GPUs (``--backend gpu``): each rank takes the GPU ``local rank mod (GPUs on its node)``, the
local rank numbering the ranks on one node; the gradient buffer is a CuPy array reduced with
NCCL (``cupy.cuda.nccl``) through a communicator whose unique id rank 0 creates and MPI
broadcasts. The small host-side reductions (ActNorm statistics, evaluation sums, digests) stay
on MPI.
"""
import contextlib
import glob
import hashlib
import json
import os
import sys
import time

import numpy as np

from data import iterate_test_batches, preprocess_rows
from nfcore.backend import get_array_module, to_device, to_numpy
from nfcore.conditioning import InverseAccuracyError
from nfcore.layers import NonFiniteError
from nfcore.layers.actnorm import moments_from

from . import cli

MPI_MISSING = ("--distributed needs mpi4py and an MPI library: pip install -e \".[mpi]\" "
               "(mpi4py and the MPICH wheel), then start it with mpiexec -n N python -m train.run "
               "--distributed ...")
SOURCE_PACKAGES = ("nfcore", "train", "data")


class RanksDisagree(ValueError):
    """Raised on every rank alike (so the job can end without MPI_Abort)."""


def check_batch_size(batch_size, size):
    """ValueError, at start-up, unless a global batch of ``batch_size`` gives each of ``size``
    ranks at least one image (a rank without rows would fail inside a layer)."""
    if batch_size < size:
        raise ValueError(f"--distributed: --batch-size {batch_size} is split over {size} ranks, "
                         f"and each rank needs at least one image per step: give --batch-size "
                         f">= {size}, or start at most {batch_size} ranks")


def check_gpus_per_machine(ranks_here, n_gpus):
    """RuntimeError, before NCCL starts, unless this machine has a GPU for each of its ranks
    (NCCL refuses two ranks on one GPU)."""
    if ranks_here > n_gpus:
        raise RuntimeError(f"--distributed --backend gpu: {ranks_here} ranks on this machine but "
                           f"{n_gpus} GPU(s); NCCL needs a GPU of its own for each rank: start at "
                           f"most {n_gpus} rank(s) per machine")


def rows_of_rank(batch_size, rank, size):
    """[lo, hi): the rows of a batch of ``batch_size`` that rank ``rank`` of ``size`` takes,
    lo = ⌊rank·B/size⌋ (contiguous, sizes differing by at most one, covering the batch)."""
    return batch_size * rank // size, batch_size * (rank + 1) // size


def code_digest(root=None):
    """SHA-256 of every .py file of the packages nfcore, train and data (names and bytes)."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for package in SOURCE_PACKAGES:
        for path in sorted(glob.glob(os.path.join(root, package, "**", "*.py"), recursive=True)):
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as file:
                digest.update(file.read())
    return digest.hexdigest()


def config_digest(config):
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def parameter_digest(layers):
    """SHA-256 of every parameter's bytes and every layer's state, in layer order."""
    digest = hashlib.sha256()
    for index, layer in enumerate(layers):
        for name, param in layer.params.items():
            digest.update(f"{index}/{name}".encode())
            digest.update(np.ascontiguousarray(to_numpy(param)).tobytes())
        for name, value in sorted(layer.state().items()):
            digest.update(f"{index}/{name}".encode())
            digest.update(np.ascontiguousarray(to_numpy(value)).tobytes())
    return digest.hexdigest()


class Communicator:
    """The ranks of one job (MPI COMM_WORLD): who am I, sums over all, agreement checks, abort.

    ``size == 1`` is allowed (``mpiexec -n 1`` or a plain ``python -m train.run
    --distributed``): every reduction is then the identity.
    """

    def __init__(self, backend="cpu"):
        try:
            from mpi4py import MPI
        except ImportError:
            raise RuntimeError(MPI_MISSING) from None
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.nccl = NcclAllreduce(self.comm) if backend == "gpu" else None

    @property
    def is_root(self):
        return self.rank == 0

    def rows(self, batch_size):
        """[lo, hi): this rank's rows of a global batch."""
        return rows_of_rank(batch_size, self.rank, self.size)

    # ---- reductions ------------------------------------------------------------------------
    def sum_host(self, values):
        """Σ over the ranks of a small float64 NumPy vector (every rank gets the sum)."""
        values = np.ascontiguousarray(values, dtype=np.float64)
        if self.size > 1:
            self.comm.Allreduce(self.MPI.IN_PLACE, values, op=self.MPI.SUM)
        return values

    def sum_buffer(self, buffer):
        """Σ over the ranks of ``buffer`` in place: NCCL for a CuPy buffer, MPI for NumPy.
        NCCL runs on one rank too (an identity, one call per step), so that ``mpiexec -n 1
        ... --backend gpu`` on a single GPU exercises it (bench/gpu_distributed.py)."""
        if self.nccl is not None and not isinstance(buffer, np.ndarray):
            self.nccl.sum(buffer)
        elif self.size > 1:
            self.comm.Allreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.SUM)

    def global_moments(self, x):
        """(mean, std) per channel of x (b, C, H, W) over every rank's slice together: the
        global batch's statistics, computed as ActNorm's ``channel_moments`` computes them for
        one batch (float64, two passes: Σx, then Σ(x − mean)²), the sums taken over the ranks."""
        xp = get_array_module(x)
        x64 = x.astype(xp.float64)
        local = np.concatenate([[x.shape[0] * x.shape[2] * x.shape[3]],
                                to_numpy(x64.sum(axis=(0, 2, 3)))])
        count_and_sums = self.sum_host(local)
        count = count_and_sums[0]
        mean = xp.asarray(count_and_sums[1:] / count)
        squares = to_numpy(((x64 - mean[None, :, None, None]) ** 2).sum(axis=(0, 2, 3)))
        variance = xp.asarray(self.sum_host(squares) / count)
        return mean.astype(x.dtype), xp.sqrt(variance).astype(x.dtype)

    # ---- agreement and failure ---------------------------------------------------------------
    def check_same(self, what, digest):
        """Every rank must hold the same ``digest``; else RanksDisagree (on every rank)."""
        digests = self.comm.allgather(digest)
        if len(set(digests)) > 1:
            groups = {}
            for rank, value in enumerate(digests):
                groups.setdefault(value, []).append(rank)
            described = "; ".join(f"ranks {ranks} have {value[:12]}" for value, ranks in groups.items())
            raise RanksDisagree(f"--distributed: the {self.size} ranks differ in their {what} "
                                f"({described}); every rank must run the same code and options")

    def abort(self, message, code=1):
        """Print ``message`` (naming this rank) and end every rank of the job."""
        print(f"error: rank {self.rank} of {self.size}: {message}; ending all ranks",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        self.comm.Abort(code)
        os._exit(code)      # MPICH's MPI_Abort can return in the calling rank (ending the others)


class NcclAllreduce:
    """Σ over the ranks of a CuPy buffer with NCCL, one GPU per rank.

    Each rank uses GPU ``local_rank mod n_gpus`` of its node (the ranks sharing a node are
    numbered by MPI's COMM_TYPE_SHARED split). Rank 0 makes the NCCL unique id; MPI broadcasts
    it; every rank joins the communicator. The reduction runs on the current CuPy stream and is
    waited for, so the buffer holds the sum when ``sum`` returns. Not run here: this machine
    has no GPU (see docs/distributed.md).
    """

    def __init__(self, comm):
        try:
            import cupy
            from cupy.cuda import nccl
        except ImportError:
            raise RuntimeError("--distributed --backend gpu needs CuPy with NCCL: pip install -e "
                               "\".[gpu,mpi]\"") from None
        from mpi4py import MPI
        self.cupy, self.nccl = cupy, nccl
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        local_rank, n_gpus = local.Get_rank(), cupy.cuda.runtime.getDeviceCount()
        check_gpus_per_machine(local.Get_size(), n_gpus)
        cupy.cuda.Device(local_rank % n_gpus).use()
        unique_id = nccl.get_unique_id() if comm.Get_rank() == 0 else None
        unique_id = comm.bcast(unique_id, root=0)
        self.communicator = nccl.NcclCommunicator(comm.Get_size(), unique_id, comm.Get_rank())
        self.types = {np.dtype(np.float32): nccl.NCCL_FLOAT32,
                      np.dtype(np.float64): nccl.NCCL_FLOAT64}

    def sum(self, buffer):
        stream = self.cupy.cuda.get_current_stream()
        self.communicator.allReduce(buffer.data.ptr, buffer.data.ptr, buffer.size,
                                    self.types[np.dtype(buffer.dtype)], self.nccl.NCCL_SUM,
                                    stream.ptr)
        stream.synchronize()


class GradientAllreduce:
    """The one flat buffer of a step: every parameter's gradient, then the loss.

        buffer = [ (B_r/B)·g_r for every parameter, in optimizer order | (B_r/B)·loss_r ]

    ``reduce(weight, loss)`` fills it from the layers' grads, sums it over the ranks in ONE
    Allreduce and writes the sums back into the grads; it returns the global loss. The buffer
    lives where the parameters live (NumPy, or CuPy on the GPU) and has their dtype.
    """

    def __init__(self, layers, communicator):
        self.communicator = communicator
        self.entries = [(layer.grads, name, param.shape, int(param.size))
                        for layer in layers for name, param in layer.params.items()]
        first = next(param for layer in layers for param in layer.params.values())
        xp = get_array_module(first)
        self.size = sum(size for *_, size in self.entries) + 1
        self.buffer = xp.zeros(self.size, dtype=first.dtype)
        self.seconds = 0.0     # time spent in the Allreduce since the last ``take_seconds``

    def reduce(self, weight, loss):
        """The global loss Σ_r (B_r/B)·loss_r; afterwards every grad holds Σ_r (B_r/B)·g_r.
        ``loss`` None (this rank's forward failed): NaN goes in, and NaN comes out everywhere."""
        buffer, offset = self.buffer, 0
        for grads, name, shape, size in self.entries:
            if loss is None:
                buffer[offset:offset + size] = np.nan
            else:
                buffer[offset:offset + size] = grads[name].reshape(-1)
            offset += size
        buffer[:-1] *= weight
        buffer[-1] = np.nan if loss is None else weight * loss
        tick = time.perf_counter()
        self.communicator.sum_buffer(buffer)
        self.seconds += time.perf_counter() - tick
        offset = 0
        for grads, name, shape, size in self.entries:
            grads[name][...] = buffer[offset:offset + size].reshape(shape)
            offset += size
        return float(buffer[-1])

    def take_seconds(self):
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def initialize_actnorms(flow, communicator, x_local):
    """Flow.forward on this rank's slice of the first batch, every ActNorm initializing from
    the global batch's statistics."""
    with moments_from(communicator.global_moments):
        flow.forward(x_local)


def distributed_loss_and_backward(flow, x_local, n_bits, global_batch, reducer, recompute=False):
    """The global batch's mean bits/dim; every layer's grads then hold its gradient, the same
    on every rank. Raises NonFiniteError on every rank alike when any rank's batch, loss or
    gradient holds NaN/Inf, or its memory-saving backward found the inverse inaccurate (every
    rank still takes part in the Allreduce)."""
    loss = None
    if get_array_module(x_local).isfinite(x_local).all():
        try:
            with np.errstate(over="ignore", invalid="ignore"):      # reported below instead
                loss, _ = flow.loss_and_backward(x_local, n_bits, recompute=recompute)
            if not np.isfinite(loss):
                loss = None
        except (NonFiniteError, FloatingPointError, InverseAccuracyError):
            loss = None         # the step is skipped on every rank, as one process skips it
    global_loss = reducer.reduce(x_local.shape[0] / global_batch, loss)
    if not np.isfinite(global_loss):
        raise NonFiniteError("NaN/Inf in the batch or the flow on at least one rank (bad input "
                             "data or a diverged model)")
    return global_loss


def load_data(communicator, load, download):
    """``load()`` on every rank; with ``download``, rank 0 first (it fetches the files) and
    the others once it is done, so that no two ranks write the same file."""
    if not download:
        return load()
    if communicator.is_root:
        data = load()
    communicator.comm.Barrier()
    if not communicator.is_root:
        data = load()
    return data


def evaluate_bits_per_dim(flow, images, n_bits, batch_size, seed, communicator):
    """Mean bits/dim over every image of ``images`` (uint8 NCHW), each test batch split over
    the ranks; the same images and noise as session.evaluate_bits_per_dim in one process (whose
    generator default_rng([seed, 2]) runs through the test set batch after batch)."""
    total, count, start = 0.0, 0, 0
    for batch in iterate_test_batches(images, batch_size):
        lo, hi = communicator.rows(len(batch))
        if hi > lo:
            x = to_device(preprocess_rows(batch[lo:hi], n_bits, [seed, 2], start + lo))
            total += float(to_numpy(flow.bits_per_dim(x, n_bits)).sum())
            count += hi - lo
        start += len(batch)
    total, count = communicator.sum_host([total, count])
    return float(total / count)


@contextlib.contextmanager
def abort_on_error(communicator):
    """Within the block, an exception on this rank ends the whole job (MPI_Abort) after one
    line naming it. RanksDisagree, raised on every rank alike, ends each rank without MPI_Abort
    (rank 0 passes it on, to be reported once; the others exit with status 1); so does a clean
    SystemExit(0)."""
    try:
        yield
    except RanksDisagree:
        if communicator.is_root:
            raise
        raise SystemExit(1) from None
    except SystemExit as stop:
        if stop.code in (None, 0):
            raise
        message = stop.code if isinstance(stop.code, str) else f"exit status {stop.code}"
        communicator.abort(message.removeprefix("error: "),
                           stop.code if isinstance(stop.code, int) else 1)
    except KeyboardInterrupt:
        communicator.abort("interrupted", 130)
    except BaseException as error:          # noqa: B036 -- any failure must end every rank
        # an expected failure in the command lines' words (train/cli.py), a bug with its type
        expected = isinstance(error, Exception) and cli.is_expected(error)
        communicator.abort(cli.describe(error) if expected else f"{type(error).__name__}: {error}")
