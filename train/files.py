"""The files the command lines write: each written whole or not at all, and one run per folder.

**Atomic writes.** ``write_atomically(path, write)`` has ``write(file)`` fill a temporary file
in the destination's folder (``.<name>.<random>.tmp``), flushes it to the disk and renames it
over ``path`` (``os.replace``: atomic on POSIX and Windows), as checkpoints are written
(train/checkpoint.py). A full disk, a crash or an interrupt at any moment leaves the previous
file or the new one, never a truncated or 0-byte one; a failed write removes its temporary
file and raises ``OutputWriteError``, one line naming the file and the reason. A temporary file
left by a killed process (kill -9) is removed by ``remove_temporaries`` (train.run does it on
start-up, holding the folder's lock). ``write_all_atomically`` writes several files so that
either all of them change or none does (every temporary file is complete before the first
rename): what a resumed run uses for config.json and metrics.jsonl.

**One run per output folder.** ``lock_folder(folder)`` takes an exclusive ``fcntl.flock`` on
``<folder>/.run.lock`` and writes this process's id into it. The lock belongs to the open file:
the OS releases it when the process ends however it ends (kill -9 included), so no stale lock
survives a crash. A second run on the same folder (or a --resume of a running one) gets
``FolderInUseError`` naming the process that holds it. Where ``fcntl`` is missing (Windows),
folders are not locked.
"""
import errno
import glob
import os
import tempfile

try:
    import fcntl
except ImportError:          # Windows: no flock; runs are not locked there
    fcntl = None

TEMPORARY_SUFFIX = ".tmp"
LOCK_NAME = ".run.lock"
REASONS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
           errno.EPERM: "permission denied", errno.ENOTDIR: "a part of the path is a file",
           errno.ENOENT: "the folder does not exist", errno.EISDIR: "it is a folder"}


class OutputWriteError(OSError):
    """The file system refused an output file; the previous file (if any) is untouched.
    One line: what could not be done, the reason in words, what is left (the class attributes;
    train/checkpoint.py's CheckpointWriteError words them for a checkpoint)."""
    CANNOT = "cannot write {path}"
    KEPT = "the previous file is kept"
    NOTHING = "nothing was written"

    def __init__(self, path, error):
        reason = REASONS.get(error.errno, error.strerror or str(error))
        previous = self.KEPT if os.path.isfile(path) else self.NOTHING
        super().__init__(error.errno, f"{self.CANNOT.format(path=path)}: {reason}; {previous}")

    def __str__(self):
        return self.strerror


class FolderInUseError(RuntimeError):
    """Another process holds the output folder's lock (a run is writing there)."""


def _temporary_for(path):
    """(file descriptor, temporary path) next to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    return tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=TEMPORARY_SUFFIX,
                            dir=folder)


def _write_temporary(path, write, binary):
    """The path of a complete, fsynced temporary file next to ``path`` filled by ``write``;
    OutputWriteError (its temporary file removed) when the file system refuses."""
    try:
        handle, temporary = _temporary_for(path)
    except OSError as error:
        raise OutputWriteError(path, error) from error
    try:
        with os.fdopen(handle, "wb" if binary else "w") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
    except BaseException as error:            # noqa: B036 -- an interrupt, too, leaves nothing
        os.remove(temporary)
        if isinstance(error, OSError) and not isinstance(error, OutputWriteError):
            raise OutputWriteError(path, error) from error
        raise
    return temporary


def write_atomically(path, write, binary=True):
    """Write ``path`` through ``write(file)`` (a binary file, or text when ``binary`` is False)
    into a temporary file renamed over ``path``: all of it or nothing (module docstring)."""
    write_all_atomically({path: write}, binary)


def write_all_atomically(writers, binary=True):
    """Write every {path: write} of ``writers`` as ``write_atomically`` does, renaming none
    until every temporary file is complete: when one fails, no file has changed."""
    temporaries = {}
    try:
        for path, write in writers.items():
            temporaries[path] = _write_temporary(path, write, binary)
        for path in list(temporaries):
            os.replace(temporaries.pop(path), path)
    except OSError as error:
        if isinstance(error, OutputWriteError):
            raise
        raise OutputWriteError(path, error) from error
    finally:
        for temporary in temporaries.values():
            if os.path.exists(temporary):
                os.remove(temporary)
    for folder in {os.path.dirname(os.path.abspath(path)) for path in writers}:
        fsync_folder(folder)


def fsync_folder(folder):
    """Make a rename in ``folder`` durable (a no-op where folders cannot be fsynced)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def remove_temporaries(folder, name=None):
    """Remove the temporary files (``.<name>.<random>.tmp``) that killed writes left in
    ``folder`` (only those of the file ``name`` when given); returns their paths. Call it only
    while holding the folder's lock (or while no other process writes that file)."""
    stem = "*" if name is None else f"{glob.escape(name)}.*"
    removed = []
    for stale in glob.glob(os.path.join(glob.escape(folder), f".{stem}{TEMPORARY_SUFFIX}")):
        try:
            os.remove(stale)
            removed.append(stale)
        except FileNotFoundError:
            pass
    return removed


def lock_folder(folder):
    """Take ``folder``'s run lock: an open file to keep open while the run writes there (close
    it, or end the process, to release it). FolderInUseError naming the holder's process id
    when another process has it."""
    path = os.path.join(folder, LOCK_NAME)
    if fcntl is None:
        return None
    try:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise OutputWriteError(path, error) from error
    lock = os.fdopen(handle, "r+")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = lock.read().strip() or "unknown"
        lock.close()
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise OutputWriteError(path, error) from error
        raise FolderInUseError(
            f"{folder} is in use by another run (process {holder} holds {path}): wait for it "
            f"to end, stop it, or choose another --out") from None
    try:                       # who holds it, for the message of the next one
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
    except OSError:            # a full disk: the lock holds all the same, without the id
        pass
    return lock
