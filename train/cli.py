"""What the command lines (train.run, sample, evaluate, reconstruct, interpolate, manipulate)
share: an argument parser whose every mistake is one line, option types that check their range
where they are parsed, the BLAS thread limit, and the rule that every expected failure ends as
one line ``error: ...`` with exit status 1 (tracebacks are left to real bugs).

Which failures are expected (``is_expected``), one line each:

- an OSError: the system refused (a file missing, the disk full, no permission), said in the
  system's words with the path; and MemoryError (a request larger than the machine);
- an exception type of this project (NonFiniteError, InverseAccuracyError, CheckpointWriteError,
  OutputWriteError, FolderInUseError, RanksDisagree, BackendUnavailable, ...);
- a ValueError raised by the project's own checks (the innermost frame of its traceback in
  nfcore/, train/ or data/), and a RuntimeError raised by train/ or data/ (a download that
  failed, MPI missing): each message names the problem and what to do.

Anything else is a bug and keeps its traceback: an error raised inside NumPy, h5py, Pillow or
Numba (a shape mismatch deep in a library), a RuntimeError of nfcore's layers ("backward called
before forward": code calling them in the wrong order), TypeError, KeyError, IndexError,
AttributeError, ... Setting the environment variable NFCORE_TRACEBACK=1 shows the traceback of
the expected failures too.

Signals: Ctrl-C (SIGINT) and SIGTERM (what ``kill`` and batch schedulers send first) end every
command with one line, ``interrupted (Ctrl-C)`` or ``terminated (SIGTERM)``, and exit status 130
or 143 (128 + the signal's number, as a shell reports a process the signal killed). SIGTERM
raises ``Terminated``, a KeyboardInterrupt, so that whatever handles Ctrl-C handles it alike:
train.run saves a checkpoint at the step reached and says so. Within ``signals_deferred()`` (a
checkpoint being saved) a further signal waits: it is noted in one line and the block finishes.
"""
import argparse
import contextlib
import errno
import os
import signal
import sys
import threading

import threadpoolctl

BLAS_THREADS_HELP = (
    "threads for BLAS (the coupling networks' matrix products); default: all cores. nfcore keeps "
    "Numba's OpenMP workers, and these command lines OpenBLAS's, from spinning against the other "
    "pool (nfcore/threads.py): on 2 cores a 3x32x32 step (L=3, K=4, width 64, B=64) takes "
    "0.76-0.86 times as long with BLAS on 2 threads as on 1 (2.2-2.4 times while they spun)")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad command line reported as one line ``error: ...`` and exit status 1."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(1)


def at_least(low, kind=int):
    """An argparse type: a number of ``kind`` no smaller than ``low``."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}"
                                             f" >= {low}, got {text!r}") from None
        if not value >= low:          # also refuses NaN
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value
    parse.__name__ = f"{kind.__name__} >= {low}"
    return parse


def in_range(low, high, kind=float, low_open=False, high_open=False):
    """An argparse type: a number in the interval from ``low`` to ``high`` (ends open or closed)."""
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}") from None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            raise argparse.ArgumentTypeError(f"must lie in {interval}, got {text}")
        return value
    parse.__name__ = f"number in {interval}"
    return parse


positive_int = at_least(1)
positive_float = in_range(0.0, float("inf"), low_open=True, high_open=True)


def limit_blas_threads(n_threads):
    """Let BLAS use at most ``n_threads`` threads from now on; None: leave it on all cores (or
    what OPENBLAS_NUM_THREADS says). See BLAS_THREADS_HELP."""
    if n_threads is None:
        return
    if n_threads < 1:
        raise ValueError(f"--blas-threads must be at least 1, got {n_threads}")
    threadpoolctl.threadpool_limits(n_threads, user_api="blas")


REASONS = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the file system is read-only",
           errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.EDQUOT: "disk quota exceeded", errno.ENOTDIR: "a part of the path is a file, "
           "not a folder", errno.EEXIST: "it exists and is a file, not a folder"}


def describe(error):
    """One line for an expected error: an OSError from the system as 'path: reason', anything
    else (our own OSErrors included) its text."""
    if isinstance(error, MemoryError):
        return f"out of memory: {error}" if str(error) else "out of memory"
    if isinstance(error, OSError) and error.errno is not None and \
            error.strerror == os.strerror(error.errno):          # the system's own words
        reason = REASONS.get(error.errno, error.strerror or str(error))
        return f"{error.filename}: {reason}" if error.filename else reason
    return str(error)


PROJECT_PACKAGES = ("nfcore", "train", "data")


def _package(module_name):
    return (module_name or "").split(".")[0]


def _raised_in(error):
    """The top-level package whose code raised ``error``: the innermost frame of its traceback."""
    frames = error.__traceback__
    if frames is None:
        return None
    while frames.tb_next is not None:
        frames = frames.tb_next
    return _package(_module_name(frames.tb_frame.f_globals))


def _module_name(module_globals):
    """The module's own name, also for the one run as ``python -m train.run``: its __name__ is
    then "__main__", its __spec__.name "train.run"."""
    name = module_globals.get("__name__")
    spec = module_globals.get("__spec__")
    if name == "__main__" and spec is not None and spec.name:
        return spec.name
    return name


def is_expected(error):
    """True when ``error`` is a failure the command lines report in one line, False for a bug
    (module docstring)."""
    if isinstance(error, (OSError, MemoryError)):
        return True
    if _package(type(error).__module__) in PROJECT_PACKAGES:
        return True
    origin = _raised_in(error)
    if isinstance(error, ValueError):
        return origin in PROJECT_PACKAGES
    return isinstance(error, RuntimeError) and origin in ("train", "data")


class Terminated(KeyboardInterrupt):
    """SIGTERM received: raised where the program is, as Ctrl-C raises KeyboardInterrupt."""


def interruption(stop):
    """(what, exit status) of a KeyboardInterrupt: Ctrl-C 130, SIGTERM (Terminated) 143."""
    if isinstance(stop, Terminated):
        return "terminated (SIGTERM)", 128 + signal.SIGTERM
    return "interrupted (Ctrl-C)", 128 + signal.SIGINT


def _raise_terminated(signum, frame):
    raise Terminated()


def _in_main_thread():
    return threading.current_thread() is threading.main_thread()


_deferring = []     # non-empty inside signals_deferred(): the signals noted there


@contextlib.contextmanager
def signals_deferred(say=None, reraise=True):
    """Inside, SIGINT and SIGTERM do not interrupt (the block, a checkpoint being saved, runs to
    its end): the first one is noted with ``say`` (default: a line on stderr) and, with
    ``reraise``, raised when the block ends (KeyboardInterrupt, or Terminated). Nested blocks
    are part of the outermost one."""
    if _deferring or not _in_main_thread():     # only the main thread may set handlers
        yield
        return

    def note(signum, frame):
        if len(_deferring) == 1:
            _deferring.append(signum)
            (say or (lambda text: print(text, file=sys.stderr, flush=True)))(
                f"note: {signal.Signals(signum).name} received while the checkpoint is being "
                f"saved: waiting for the save to end")

    _deferring.append(None)
    previous = {number: signal.signal(number, note) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        noted = _deferring[1:]
        _deferring.clear()
    if noted and reraise:
        raise Terminated() if noted[0] == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def stop_requests():
    """Inside, SIGINT and SIGTERM only note that a stop was asked for (the list yielded gets
    the signal's number), and the code acts on it where it checks (``raise_requested_stop``):
    train.run between steps, where it then says so in one line. A handler that
    raised where the signal lands could raise inside a Numba kernel or its compiler, where the
    exception comes out as a SystemError ("returned a result with an exception set") instead
    of the KeyboardInterrupt the loop handles."""
    requested = []
    if not _in_main_thread():                  # only the main thread may set handlers
        yield requested
        return

    def note(signum, frame):
        requested.append(signum)

    previous = {number: signal.signal(number, note) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)


def raise_requested_stop(requested):
    """Raise the stop a signal asked for inside ``stop_requests`` (Terminated for SIGTERM,
    KeyboardInterrupt for SIGINT); nothing when none was."""
    if requested:
        raise Terminated() if requested[0] == signal.SIGTERM else KeyboardInterrupt()


def _interruption_behind(error):
    """The KeyboardInterrupt (Ctrl-C, or Terminated) an exception was raised while handling, if
    any: a signal handler that raises inside a Numba kernel or its compiler comes out as a
    SystemError ("returned a result with an exception set") whose context is the interrupt."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def run_command(command, args):
    """``command(args)``; an expected failure becomes ``error: <one line>`` and exit status 1,
    Ctrl-C or SIGTERM one line and status 130 or 143 (module docstring)."""
    installed = _in_main_thread()
    if installed:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return command(args)
    except KeyboardInterrupt as stop:
        what, status = interruption(stop)
        print(what, file=sys.stderr)
        raise SystemExit(status) from None
    except Exception as error:               # noqa: BLE001 -- sorted by is_expected
        stop = _interruption_behind(error)
        if stop is not None:                   # Ctrl-C / SIGTERM inside a Numba kernel
            what, status = interruption(stop)
            print(what, file=sys.stderr)
            raise SystemExit(status) from None
        if not is_expected(error) or os.environ.get("NFCORE_TRACEBACK"):
            raise                              # a bug: its traceback
        print(f"error: {' '.join(describe(error).split())}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if installed:             # None: a handler set outside Python, the default for us
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
