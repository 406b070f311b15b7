"""What train.run does to its --out folder (issue 23): one run at a time (a lock the OS
releases when the process dies), every file written whole or not at all, a failed --resume
that changes nothing, and SIGTERM / SIGINT handled alike."""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from train import interpolate, run, sample
from train.files import (LOCK_NAME, FolderInUseError, OutputWriteError, lock_folder,
                         write_all_atomically, write_atomically)

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


# ---- every file written whole or not at all ---------------------------------------------------
def full_disk(monkeypatch):
    """From now on the disk is full: the bytes of any new file fail to reach it (ENOSPC)."""
    def full(handle):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)


def snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_a_failed_resume_on_a_full_disk_changes_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    run.main(TINY + ["--max-steps", "2", "--eval-every", "1", "--out", str(out)])
    before = snapshot(out)
    full_disk(monkeypatch)
    line = one_line_error(capsys, TINY + ["--max-steps", "30", "--out", str(out), "--resume"])
    assert "no space left on the device" in line
    monkeypatch.undo()
    assert snapshot(out) == before        # config.json and metrics.jsonl unchanged, no .tmp left


def test_a_picture_over_an_old_one_on_a_full_disk_keeps_the_old_one(tmp_path, capsys,
                                                                   monkeypatch):
    out = tmp_path / "run"
    run.main(TINY + ["--max-steps", "1", "--out", str(out)])
    ckpt = str(out / "checkpoint.h5")
    picture = tmp_path / "s.png"
    sample.main(["--ckpt", ckpt, "--n", "4", "--out", str(picture)])
    old = picture.read_bytes()
    full_disk(monkeypatch)
    for command, argv in ((sample, ["--n", "9"]), (interpolate, ["--indices", "0", "1"])):
        with pytest.raises(SystemExit):
            command.main(["--ckpt", ckpt, "--out", str(picture)] + argv)
        error = capsys.readouterr().err
        assert f"cannot write {picture}: no space left on the device; the previous file is " \
               f"kept" in error, error
        assert picture.read_bytes() == old
        assert sorted(os.listdir(tmp_path)) == ["run", "s.png"]
    with pytest.raises(SystemExit):
        interpolate.main(["--ckpt", ckpt, "--indices", "0", "1", "--out", str(tmp_path / "i.png")])
    assert "nothing was written" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["run", "s.png"]     # no 0-byte i.png


@pytest.mark.parametrize("failure", [OSError(errno.EIO, "I/O error"), KeyboardInterrupt()])
def test_write_atomically_leaves_the_previous_file_or_the_new_one(tmp_path, failure):
    path = tmp_path / "final.json"
    path.write_text("old")

    def half_then_fail(file):
        file.write("ne")
        raise failure

    with pytest.raises(type(failure)):
        write_atomically(str(path), half_then_fail, binary=False)
    assert os.listdir(tmp_path) == ["final.json"] and path.read_text() == "old"
    write_atomically(str(path), lambda file: file.write("new"), binary=False)
    assert os.listdir(tmp_path) == ["final.json"] and path.read_text() == "new"


def test_write_all_atomically_changes_all_files_or_none(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("old a")

    def fail(file):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OutputWriteError, match="cannot write .*b: no space left"):
        write_all_atomically({str(a): lambda file: file.write("new a"), str(b): fail}, binary=False)
    assert os.listdir(tmp_path) == ["a"] and a.read_text() == "old a"


def test_start_up_removes_what_killed_writes_left(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in (".config.json.x1.tmp", ".bpd.png.y2.tmp", ".metrics.jsonl.z3.tmp"):
        (out / name).write_bytes(b"")
    run.main(TINY + ["--max-steps", "1", "--out", str(out)])
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    assert "removed 3 temporary file(s)" in capsys.readouterr().err


# ---- signals ----------------------------------------------------------------------------------
def test_sigterm_saves_a_checkpoint_at_the_step_reached_says_so_and_exits_143(tmp_path):
    out = tmp_path / "run"
    training = subprocess.Popen(
        [sys.executable, "-m", "train.run", *TINY, "--max-steps", "100000", "--eval-every",
         "100000", "--sample-every", "100000", "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    assert training.stdout.readline().startswith("nfcore: ")     # training starts now
    time.sleep(1.0)
    training.send_signal(signal.SIGTERM)
    stdout, stderr = training.communicate(timeout=60)
    assert training.returncode == 143, stderr
    said = [line for line in (stdout + stderr).splitlines() if "SIGTERM" in line]
    assert len(said) == 1 and said[0].startswith("terminated (SIGTERM) at step "), stdout + stderr
    assert "Traceback" not in stderr
    step = int(said[0].split("at step ")[1].split(":")[0])
    from train.checkpoint import load_checkpoint
    assert step > 0 and load_checkpoint(str(out / "checkpoint.h5"))[1]["step"] == step


def test_a_second_signal_during_the_save_waits_for_it(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_step, real_save = run.Run.train_step, run.save_training_checkpoint

    def interrupted_at_step_3(self, x):
        if self.step == 3:
            raise KeyboardInterrupt
        return real_step(self, x)

    def save_hit_by_a_signal(path, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)             # Ctrl-C again, handled right here
        real_save(path, *args, **kwargs)

    monkeypatch.setattr(run.Run, "train_step", interrupted_at_step_3)
    monkeypatch.setattr(run, "save_training_checkpoint", save_hit_by_a_signal)
    handler_before = signal.getsignal(signal.SIGINT)    # SIG_IGN in a shell's background job
    with pytest.raises(SystemExit) as stop:
        run.main(TINY + ["--max-steps", "10", "--out", str(out)])
    assert stop.value.code == 130
    said = capsys.readouterr()
    assert "interrupted (Ctrl-C) at step 3: saving a checkpoint" in said.out
    assert "note: SIGINT received while the checkpoint is being saved: waiting for the save " \
           "to end" in said.out + said.err
    from train.checkpoint import load_checkpoint
    assert load_checkpoint(str(out / "checkpoint.h5"))[1]["step"] == 3
    assert signal.getsignal(signal.SIGINT) == handler_before                 # restored


@pytest.mark.parametrize("tool", ["interpolate", "sample", "evaluate", "reconstruct",
                                  "manipulate"])
def test_ctrl_c_in_every_tool_is_one_line_and_status_130(tmp_path, capsys, monkeypatch, tool):
    from train import evaluate, manipulate, reconstruct
    commands = {"interpolate": (interpolate, ["--indices", "0", "1"]), "sample": (sample, []),
                "evaluate": (evaluate, []), "reconstruct": (reconstruct, []),
                "manipulate": (manipulate, ["--data-dir", str(tmp_path), "--attributes",
                                            str(tmp_path / "a.txt"), "--attribute", "Smiling"])}
    module, argv = commands[tool]
    out = tmp_path / "run"
    run.main(TINY + ["--max-steps", "1", "--out", str(out)])
    capsys.readouterr()

    def pressed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "open_checkpoint", pressed)
    with pytest.raises(SystemExit) as stop:
        module.main(["--ckpt", str(out / "checkpoint.h5"), *argv])
    assert stop.value.code == 130
    assert capsys.readouterr().err == "interrupted (Ctrl-C)\n"


def test_sigterm_in_a_tool_is_one_line_and_status_143(capsys):
    from train.cli import run_command

    def killed(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    with pytest.raises(SystemExit) as stop:
        run_command(killed, None)
    assert stop.value.code == 143 and capsys.readouterr().err == "terminated (SIGTERM)\n"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
