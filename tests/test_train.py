"""The training CLI end to end on the embedded digits: exact resume, real learning, clear
errors, skipped NaN steps, and the sample / evaluate commands."""
import errno
import json
import os

import numpy as np
import pytest

from train import evaluate, run, sample
from train.checkpoint import load_checkpoint
from train.session import build_flow, evaluate_bits_per_dim
from data import Batches, load_dataset
from nfcore.optim import Adam

TINY = ["--levels", "2", "--steps", "1", "--hidden", "8", "--batch-size", "32"]


def model_arrays(path):
    arrays, meta = load_checkpoint(path)
    return {k: v for k, v in arrays.items() if k.startswith(("model/", "state/", "optim/"))}, meta


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    common = TINY + ["--eval-every", "5", "--sample-every", "1000", "--invconv", "cinc"]
    run.main(common + ["--max-steps", "12", "--out", straight])
    run.main(common + ["--max-steps", "7", "--out", split])
    run.main(common + ["--max-steps", "12", "--out", split, "--resume"])
    a, meta_a = model_arrays(os.path.join(straight, "checkpoint.h5"))
    b, meta_b = model_arrays(os.path.join(split, "checkpoint.h5"))
    assert meta_a["step"] == meta_b["step"] == 12
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    with open(os.path.join(split, "metrics.jsonl")) as file:
        steps = [json.loads(line)["step"] for line in file if "train_bpd" in line]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_a_short_run_really_learns(tmp_path):
    """Held-out bits/dim after 150 steps is clearly below its value at initialization."""
    out = str(tmp_path / "learn")
    final = run.main(["--max-steps", "150", "--eval-every", "1000", "--sample-every", "1000",
                      "--out", out])
    with open(os.path.join(out, "config.json")) as file:
        config = json.load(file)
    _, test = load_dataset("digits")
    untrained = build_flow(config)
    train_images, _ = load_dataset("digits")
    untrained.forward(Batches(train_images, config["batch_size"], config["n_bits"],
                              config["seed"])(0))          # the same ActNorm initialization
    initial = evaluate_bits_per_dim(untrained, test, config["n_bits"], 64, config["seed"])
    assert final["test_bpd"] < initial - 0.5, (initial, final["test_bpd"])
    for name in ("bpd.png", "final.json", "samples_step150_t0.7.png", "samples_step150_t1.0.png"):
        assert os.path.exists(os.path.join(out, name)), name


def test_sample_and_evaluate_commands(tmp_path, capsys):
    out = str(tmp_path / "run")
    final = run.main(TINY + ["--max-steps", "3", "--out", out])
    ckpt = os.path.join(out, "checkpoint.h5")
    sample.main(["--ckpt", ckpt, "--n", "9", "--out", str(tmp_path / "s.png")])
    assert os.path.getsize(tmp_path / "s.png") > 0
    result = evaluate.main(["--ckpt", ckpt])
    assert result["images"] == len(load_dataset("digits")[1])
    assert result["bits_per_dim"] == pytest.approx(final["test_bpd"], rel=1e-6)


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "checkpoint.h5"
    bad.write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(SystemExit) as stop:
        sample.main(["--ckpt", str(bad)])
    assert stop.value.code == 1
    assert str(bad) in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.main(TINY + ["--out", str(tmp_path), "--resume"])
    assert str(bad) in capsys.readouterr().err


def test_resume_refuses_a_different_model(tmp_path, capsys):
    out = str(tmp_path / "run")
    run.main(TINY + ["--max-steps", "2", "--out", out])
    capsys.readouterr()
    for option, value in (("--steps", "2"), ("--image-size", "16"), ("--n-bits", "5")):
        with pytest.raises(SystemExit) as stop:
            run.main([option, value, "--out", out, "--resume", "--max-steps", "4"])
        assert stop.value.code == 1
        error = capsys.readouterr().err
        assert error.startswith(f"error: --resume: the checkpoint was trained with {option} ")
        assert f", not {value};" in error and error.count("\n") == 1


def test_nan_steps_are_skipped_then_the_run_stops_keeping_the_last_checkpoint(tmp_path, monkeypatch,
                                                                             capsys):
    out = str(tmp_path / "run")
    run.main(TINY + ["--max-steps", "2", "--out", out])
    before, _ = model_arrays(os.path.join(out, "checkpoint.h5"))
    real_batches = Batches.__call__

    def poisoned(self, step, rows=None):
        x = real_batches(self, step, rows)
        x[0, 0, 0, 0] = np.nan
        return x

    monkeypatch.setattr(Batches, "__call__", poisoned)
    with pytest.raises(SystemExit) as stop:
        run.main(TINY + ["--max-steps", "100", "--out", out, "--resume"])
    assert stop.value.code == 1
    error = capsys.readouterr().err.strip().split("\n")[-1]
    assert error.startswith("error: 20 steps in a row had NaN/Inf") and "bad input data" in error
    assert f"The last good checkpoint is {os.path.join(out, 'checkpoint.h5')}." in error
    after, meta = model_arrays(os.path.join(out, "checkpoint.h5"))
    assert meta["step"] == 2
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    with open(os.path.join(out, "metrics.jsonl")) as file:
        skipped = [json.loads(line) for line in file if "skipped" in line]
    assert len(skipped) == run.MAX_BAD_STEPS and "NaN" in skipped[0]["skipped"]
    assert all("bad input data" in record["skipped"] for record in skipped)


def test_missing_dataset_file_names_the_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert "nowhere" in capsys.readouterr().err


def test_help_explains(capsys):
    with pytest.raises(SystemExit) as stop:
        run.main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for word in ("--dataset", "--invconv", "--resume", "digits", "checkpoint"):
        assert word in text


# ---- every mistake is one line, nothing is silently ignored -----------------------------------

def one_line_error(capsys, main, argv):
    """Run a command line that must fail: exit status 1 and a single line 'error: ...'."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 1, argv
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
    return lines[0]


@pytest.mark.parametrize("option, value, allowed", [
    ("--max-steps", "0", ">= 1"), ("--levels", "0", ">= 1"), ("--levels", "-1", ">= 1"),
    ("--steps", "0", ">= 1"), ("--hidden", "0", ">= 1"), ("--k", "0", ">= 1"),
    ("--batch-size", "0", ">= 1"), ("--eval-every", "0", ">= 1"), ("--sample-every", "0", ">= 1"),
    ("--epochs", "0", ">= 1"), ("--warmup", "-1", ">= 0"), ("--seed", "-1", ">= 0"),
    ("--n-bits", "9", "[1, 8]"), ("--n-bits", "0", "[1, 8]"), ("--lr", "0", "(0.0, inf)"),
    ("--lr", "nan", "(0.0, inf)"), ("--max-grad-norm", "-1", "(0.0, inf)"),
    ("--ema", "1", "[0.0, 1.0)"), ("--time-budget", "0", "(0.0, inf)"),
    ("--blas-threads", "0", ">= 1"), ("--image-size", "0", ">= 1"), ("--levels", "two", ">= 1"),
])
def test_train_run_checks_every_option_where_it_is_parsed(capsys, option, value, allowed):
    line = one_line_error(capsys, run.main, [option, value, "--out", "never-written"])
    assert option in line and allowed in line and value in line
    assert not os.path.exists("never-written")


def test_emerging_needs_an_odd_kernel_size(capsys):
    line = one_line_error(capsys, run.main, ["--invconv", "emerging", "--k", "4"])
    assert "--k" in line and "odd" in line and "4" in line


@pytest.mark.parametrize("command, argv, words", [
    (sample.main, ["--n", "0"], ["--n", ">= 1"]),
    (sample.main, ["--temperature", "-1"], ["--temperature", ">= 0.0"]),
    (sample.main, ["--seed", "-2"], ["--seed", ">= 0"]),
    (evaluate.main, ["--batch-size", "0"], ["--batch-size", ">= 1"]),
    (evaluate.main, ["--weights", "best"], ["--weights", "invalid choice"]),
    (sample.main, [], ["--ckpt"]),
])
def test_sample_and_evaluate_check_their_options(capsys, command, argv, words):
    line = one_line_error(capsys, command, ["--ckpt", "c.h5"] * ("--ckpt" not in words) + argv)
    for word in words:
        assert word in line


def test_an_output_folder_that_cannot_be_gives_one_line(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    line = one_line_error(capsys, run.main, TINY + ["--max-steps", "1", "--out", str(a_file)])
    assert f"--out {a_file} is a file" in line
    line = one_line_error(capsys, run.main, TINY + ["--max-steps", "1", "--out", str(a_file / "x")])
    assert "a part of the path is a file" in line

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(os, "makedirs", read_only)
    line = one_line_error(capsys, run.main, TINY + ["--max-steps", "1", "--out", str(tmp_path / "ro")])
    assert "Read-only file system" in line and "ro" in line


def test_sample_and_evaluate_turn_os_errors_into_one_line(tmp_path, capsys):
    out = str(tmp_path / "run")
    run.main(TINY + ["--max-steps", "1", "--out", out])
    ckpt = os.path.join(out, "checkpoint.h5")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    line = one_line_error(capsys, sample.main, ["--ckpt", ckpt, "--n", "4", "--out",
                                                str(a_file / "s.png")])
    assert str(a_file / "s.png") in line
    line = one_line_error(capsys, evaluate.main, ["--ckpt", str(tmp_path)])
    assert str(tmp_path) in line
    line = one_line_error(capsys, sample.main, ["--ckpt", str(tmp_path / "none.h5")])
    assert "none.h5" in line


def test_evaluate_and_sample_use_the_weights_train_run_reports(tmp_path, capsys):
    """With --ema, final.json's bits/dim is the EMA model's, and so is train.evaluate's."""
    out = str(tmp_path / "ema")
    final = run.main(TINY + ["--max-steps", "20", "--ema", "0.9", "--out", out])
    assert final["weights"] == "ema"
    ckpt = os.path.join(out, "checkpoint.h5")
    assert evaluate.main(["--ckpt", ckpt])["bits_per_dim"] == pytest.approx(final["test_bpd"],
                                                                             rel=1e-12)
    raw = evaluate.main(["--ckpt", ckpt, "--weights", "raw"])
    assert raw["weights"] == "raw" and abs(raw["bits_per_dim"] - final["test_bpd"]) > 1e-4
    capsys.readouterr()
    sample.main(["--ckpt", ckpt, "--n", "4", "--out", str(tmp_path / "s.png")])
    assert "(ema weights)" in capsys.readouterr().out


def test_resume_applies_and_records_changed_training_options(tmp_path, capsys):
    out = str(tmp_path / "run")
    run.main(TINY + ["--max-steps", "10", "--lr", "1e-3", "--warmup", "0", "--out", out])
    capsys.readouterr()
    run.main(["--out", out, "--resume", "--max-steps", "20", "--lr", "2e-4", "--ema", "0.5",
              "--max-grad-norm", "7", "--recompute", "--eval-every", "1000"])
    printed = capsys.readouterr().out
    assert "--lr 0.001 -> 0.0002" in printed and "--recompute False -> True" in printed
    with open(os.path.join(out, "config.json")) as file:
        config = json.load(file)
    assert (config["lr"], config["ema"], config["max_grad_norm"], config["recompute"]) == \
           (2e-4, 0.5, 7.0, True)
    with open(os.path.join(out, "metrics.jsonl")) as file:
        records = [json.loads(line) for line in file]
    assert {"step": 10, "resumed_with": {"lr": 2e-4, "ema": 0.5, "max_grad_norm": 7.0,
                                         "recompute": True, "max_steps": 20,
                                         "eval_every": 1000}} in records
    logged_lr = [r["lr"] for r in records if "lr" in r]
    assert logged_lr == [1e-3, 2e-4]
    arrays, meta = load_checkpoint(os.path.join(out, "checkpoint.h5"))
    assert meta["config"]["lr"] == 2e-4 and any(k.startswith("optim/ema/") for k in arrays)


def test_resume_drops_a_torn_last_metrics_line_with_a_note(tmp_path, capsys):
    out = str(tmp_path / "run")
    run.main(TINY + ["--max-steps", "10", "--out", out])
    with open(os.path.join(out, "metrics.jsonl"), "a") as file:
        file.write('{"step": 11, "train_b')                       # a crash mid-write
    capsys.readouterr()
    run.main(["--out", out, "--resume", "--max-steps", "12"])
    assert "dropped its torn last line" in capsys.readouterr().err
    with open(os.path.join(out, "metrics.jsonl")) as file:
        steps = [json.loads(line)["step"] for line in file]
    assert steps[-1] == 12
    with open(os.path.join(out, "metrics.jsonl"), "r+") as file:     # a bad line in the middle
        lines = file.readlines()
        file.seek(0)
        file.writelines(lines[:1] + ["{torn\n"] + lines[1:])
    line = one_line_error(capsys, run.main, ["--out", out, "--resume", "--max-steps", "13"])
    assert "metrics.jsonl, line 2" in line


def test_a_diverged_run_is_reported_as_divergence_naming_no_missing_checkpoint(tmp_path, capsys,
                                                                               monkeypatch):
    """The optimizer blows the weights up at the first step: every later step overflows."""
    real_step = Adam.step

    def exploding_step(self):
        norm = real_step(self)
        for layer in self.layers:
            for param in layer.params.values():
                param *= 1e30
        return norm

    monkeypatch.setattr(Adam, "step", exploding_step)
    out = str(tmp_path / "run")
    line = one_line_error(capsys, run.main, TINY + ["--max-steps", "50", "--out", out])
    assert "diverged" in line and "bad input" not in line
    assert "No checkpoint was written yet" in line and "checkpoint.h5" not in line
    assert not os.path.exists(os.path.join(out, "checkpoint.h5"))


def test_start_up_removes_temporary_checkpoints_a_killed_save_left(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".checkpoint.h5.k2j4x8.tmp"
    stale.write_bytes(b"half a checkpoint")
    run.main(TINY + ["--max-steps", "1", "--out", str(out)])
    assert not stale.exists()
    assert "removed 1 temporary file" in capsys.readouterr().err


def test_a_full_disk_during_a_run_ends_with_one_line_and_keeps_the_checkpoint(tmp_path, capsys,
                                                                            monkeypatch):
    out = str(tmp_path / "run")
    run.main(TINY + ["--max-steps", "2", "--out", out])
    before, _ = model_arrays(os.path.join(out, "checkpoint.h5"))

    real_fsync, started = os.fsync, []

    def full(handle):                                   # the disk fills once training started
        if not started:
            return real_fsync(handle)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_describe = run.Run.describe
    monkeypatch.setattr(run.Run, "describe", lambda self: started.append(1) or real_describe(self))
    monkeypatch.setattr(os, "fsync", full)
    line = one_line_error(capsys, run.main, TINY + ["--max-steps", "4", "--eval-every", "3",
                                                    "--out", out, "--resume"])
    assert line == (f"error: cannot save the checkpoint {os.path.join(out, 'checkpoint.h5')}: no "
                    f"space left on the device; the previous checkpoint is kept")
    monkeypatch.undo()
    after, meta = model_arrays(os.path.join(out, "checkpoint.h5"))
    assert meta["step"] == 2 and not [name for name in os.listdir(out) if name.endswith(".tmp")]
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
