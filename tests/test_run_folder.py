"""What train.run does to its --out folder (issue 23): one run at a time (a lock the OS
releases when the process dies), every file written whole or not at all, a failed --resume
that changes nothing, and SIGTERM / SIGINT handled alike."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from train import run
from train.files import LOCK_NAME, FolderInUseError, lock_folder

TINY = ["--levels", "2", "--steps", "1", "--hidden", "8", "--batch-size", "32"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as stop:
        run.main(argv)
    assert stop.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1, error
    return error.strip()


def hold_lock(folder):
    """Another process that takes ``folder``'s lock and keeps it until killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from train.files import lock_folder
            lock = lock_folder({str(folder)!r})
            print("locked", flush=True)
            time.sleep(60)
        """)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_on_the_same_folder_names_the_holder_and_exits_1(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = hold_lock(out)
    try:
        line = one_line_error(capsys, TINY + ["--max-steps", "1", "--out", str(out)])
        assert f"{out} is in use by another run (process {holder.pid} holds" in line
        assert os.listdir(out) == [LOCK_NAME]              # nothing else written
    finally:
        holder.kill()
        holder.wait()
    run.main(TINY + ["--max-steps", "1", "--out", str(out)])   # kill -9 left no stale lock
    assert os.path.exists(out / "checkpoint.h5")


def test_resume_of_a_running_folder_is_refused_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    run.main(TINY + ["--max-steps", "2", "--out", str(out)])
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    holder = hold_lock(out)
    try:
        line = one_line_error(capsys, TINY + ["--max-steps", "4", "--out", str(out), "--resume"])
        assert f"process {holder.pid}" in line
    finally:
        holder.kill()
        holder.wait()
    after = {name: (out / name).read_bytes() for name in os.listdir(out)}
    assert after.keys() == before.keys()
    for name in before:
        assert name == LOCK_NAME or after[name] == before[name], name


def test_a_run_releases_the_folder_when_it_ends_or_fails(tmp_path, capsys):
    out = tmp_path / "run"
    run.main(TINY + ["--max-steps", "1", "--out", str(out)])
    lock_folder(str(out)).close()                     # free after a run
    one_line_error(capsys, TINY + ["--max-steps", "2", "--out", str(out), "--resume",
                                   "--steps", "3"])      # refused on resume
    lock = lock_folder(str(out))                      # free after a failed start
    with pytest.raises(FolderInUseError, match=f"process {os.getpid()} holds"):
        lock_folder(str(out))
    lock.close()
