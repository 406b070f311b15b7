"""The training CLI end to end on the embedded digits: exact resume, real learning, clear
errors, skipped NaN steps, and the sample / evaluate commands."""
import json
import os

import numpy as np
import pytest

from train import evaluate, run, sample
from train.checkpoint import load_checkpoint
from train.session import build_flow, evaluate_bits_per_dim
from data import load_dataset

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
    untrained.forward(run.Batches(train_images, config["batch_size"], config["n_bits"],
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


def test_resume_refuses_a_different_model(tmp_path):
    out = str(tmp_path / "run")
    run.main(TINY + ["--max-steps", "2", "--out", out])
    with pytest.raises(SystemExit, match="--steps 1, not 2"):
        run.main(["--steps", "2", "--out", out, "--resume", "--max-steps", "4"])


def test_nan_steps_are_skipped_then_the_run_stops_keeping_the_last_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    run.main(TINY + ["--max-steps", "2", "--out", out])
    before, _ = model_arrays(os.path.join(out, "checkpoint.h5"))
    real_batches = run.Batches.__call__

    def poisoned(self, step):
        x = real_batches(self, step)
        x[0, 0, 0, 0] = np.nan
        return x

    monkeypatch.setattr(run.Batches, "__call__", poisoned)
    with pytest.raises(SystemExit, match="NaN/Inf"):
        run.main(TINY + ["--max-steps", "100", "--out", out, "--resume"])
    after, meta = model_arrays(os.path.join(out, "checkpoint.h5"))
    assert meta["step"] == 2
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    with open(os.path.join(out, "metrics.jsonl")) as file:
        skipped = [json.loads(line) for line in file if "skipped" in line]
    assert len(skipped) == run.MAX_BAD_STEPS and "NaN" in skipped[0]["skipped"]


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
