"""Checkpoints: round trip, what a training checkpoint holds, corrupt and foreign files, atomic writes, a file system
that says no."""
import errno
import os
import tempfile

import h5py
import numpy as np
import pytest

from train.checkpoint import (FORMAT_VERSION, CheckpointWriteError, load_checkpoint,
                              remove_stale_temporaries, save_checkpoint)


def sample_arrays():
    rng = np.random.default_rng(0)
    return {
        "layers/0/weight": rng.standard_normal((3, 3, 2, 2)).astype(np.float32),
        "layers/0/bias": rng.standard_normal(3),                           # float64
        "layers/12/indices": np.arange(5, dtype=np.int64),
        "optim/m/0/weight": np.zeros((3, 3, 2, 2), np.float32),
        "initialized": np.array([True, False]),
        "step": np.array(7),
    }


def test_round_trip_arrays_and_meta(tmp_path):
    arrays = sample_arrays()
    meta = {"config": {"levels": 3, "steps": 32, "lr": 1e-3}, "dataset": "cifar10",
            "step": 1200, "epoch": 3, "actnorm_initialized": [True, True, False],
            "loss": np.float32(3.5), "shape": np.array([1, 2])}
    path = tmp_path / "run" / "checkpoint.h5"            # the folder is created
    save_checkpoint(path, arrays, meta)
    loaded, loaded_meta = load_checkpoint(path)
    assert set(loaded) == set(arrays)
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        np.testing.assert_array_equal(loaded[name], array)
    assert loaded_meta == {**meta, "loss": 3.5, "shape": [1, 2]}
    with h5py.File(path, "r") as file:
        assert isinstance(file["layers/0"], h5py.Group)  # nested names are groups
        assert file.attrs["format_version"] == FORMAT_VERSION
    assert os.listdir(path.parent) == ["checkpoint.h5"]


def test_a_training_checkpoint_holds_what_resume_needs(tmp_path):
    """What train.run saves (train/session.py): every parameter, every layer state (ActNorm's
    initialization), Adam's moments, its step count and the EMA, each restored exactly; the
    data order needs no generator state (data.Batches draws the batch of step s from (seed, s)),
    so none is saved."""
    from nfcore.flow import Flow
    from nfcore.optim import Adam
    from train.session import load_flow, optimizer_state, save_training_checkpoint

    def trained():
        flow = Flow((1, 8, 8), levels=2, steps=1, hidden=8, seed=0)
        x = np.random.default_rng(0).uniform(-0.5, 0.5, (4, 1, 8, 8)).astype(np.float32)
        flow.forward(x)
        optimizer = Adam(flow.layers, lr=1e-2, ema_decay=0.9)
        for _ in range(3):
            optimizer.zero_grad()
            flow.loss_and_backward(x, 4)
            optimizer.step()
        return flow, optimizer

    flow, optimizer = trained()
    config = dict(image_shape=[1, 8, 8], levels=2, steps=1, hidden=8, invconv="finc",
                  coupling="affine", k=3, seed=0, scale_bound=None, n_bits=4, batch_size=4,
                  dataset="digits", ema=0.9)
    path = tmp_path / "checkpoint.h5"
    save_training_checkpoint(path, flow, optimizer, {"config": config, "step": 3})
    loaded, meta, arrays = load_flow(path, weights="raw")
    assert meta["step"] == 3 and meta["optimizer_step"] == 3 and "rng" not in meta
    restored = Adam(loaded.layers, lr=1e-2, ema_decay=0.9)
    restored.load_state_dict(optimizer_state(arrays, meta))
    for before, after in zip(flow.layers, loaded.layers):
        assert after.state().keys() == before.state().keys()
        for name, value in before.state().items():
            np.testing.assert_array_equal(after.state()[name], value)
        for name, param in before.params.items():
            np.testing.assert_array_equal(after.params[name], param)
    assert restored.state_dict().keys() == optimizer.state_dict().keys()
    for name, value in optimizer.state_dict().items():
        np.testing.assert_array_equal(restored.state_dict()[name], value)
    averaged, meta, _ = load_flow(path, weights="ema")
    assert meta["weights"] == "ema"
    for index, layer in enumerate(averaged.layers):
        for name, param in layer.params.items():
            np.testing.assert_array_equal(param, optimizer.ema[f"{index}/{name}"])


def test_overwrite_replaces_the_previous_checkpoint(tmp_path):
    path = tmp_path / "c.h5"
    save_checkpoint(path, {"a": np.zeros(2)}, {"step": 1})
    save_checkpoint(path, {"b": np.ones(3)}, {"step": 2})
    arrays, meta = load_checkpoint(path)
    assert list(arrays) == ["b"] and meta == {"step": 2}


def test_missing_corrupt_and_foreign_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.h5"):
        load_checkpoint(tmp_path / "nothing.h5")
    noise = tmp_path / "noise.h5"
    noise.write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(ValueError, match="noise.h5.*truncated or corrupt"):
        load_checkpoint(noise)
    good = tmp_path / "good.h5"
    save_checkpoint(good, sample_arrays(), {"step": 1})
    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut.h5"):
        load_checkpoint(cut)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as file:
        file["x"] = np.zeros(3)
    with pytest.raises(ValueError, match="foreign.h5.*not an nfcore checkpoint"):
        load_checkpoint(foreign)
    with h5py.File(good, "a") as file:
        file.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ValueError, match="good.h5.*format version"):
        load_checkpoint(good)


def test_bad_arguments(tmp_path):
    path = tmp_path / "c.h5"
    with pytest.raises(ValueError, match="'/lead'"):
        save_checkpoint(path, {"/lead": np.zeros(1)}, {})
    with pytest.raises(ValueError, match="'layers/0'.*group"):
        save_checkpoint(path, {"layers/0": np.zeros(1), "layers/0/w": np.zeros(1)}, {})
    with pytest.raises(TypeError, match="'names'.*dtype"):
        save_checkpoint(path, {"names": np.array(["a", "b"])}, {})
    with pytest.raises(TypeError, match="JSON cannot store"):
        save_checkpoint(path, {}, {"bad": object()})
    assert not path.exists() and os.listdir(tmp_path) == []


def test_crash_during_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.h5"
    save_checkpoint(path, {"w": np.arange(4.0)}, {"step": 1})
    real_create_dataset = h5py.Group.create_dataset
    calls = []

    def crash_on_second_array(self, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_create_dataset(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", crash_on_second_array)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, {"w": np.zeros(4), "v": np.zeros(4)}, {"step": 2})
    assert os.listdir(tmp_path) == ["c.h5"]               # no temporary file left behind
    arrays, meta = load_checkpoint(path)
    np.testing.assert_array_equal(arrays["w"], np.arange(4.0))
    assert meta == {"step": 1}


def refusing(code):
    """A stand-in for os.fsync that fails with ``code`` (a full disk reports ENOSPC there)."""
    def fsync(handle):
        raise OSError(code, os.strerror(code))
    return fsync


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "no space left on the device"),
                                          (errno.EROFS, "the file system is read-only"),
                                          (errno.EACCES, "permission denied")])
def test_a_file_system_that_says_no_keeps_the_previous_checkpoint(tmp_path, monkeypatch, code, reason):
    path = tmp_path / "c.h5"
    save_checkpoint(path, {"w": np.arange(4.0)}, {"step": 1})
    monkeypatch.setattr(os, "fsync", refusing(code))           # the bytes fail to reach the disk
    with pytest.raises(CheckpointWriteError) as failure:
        save_checkpoint(path, {"w": np.zeros(4)}, {"step": 2})
    assert str(failure.value) == f"cannot save the checkpoint {path}: {reason}; the previous " \
                                 f"checkpoint is kept"
    assert failure.value.errno == code
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["c.h5"]                     # the temporary file is gone
    arrays, meta = load_checkpoint(path)
    np.testing.assert_array_equal(arrays["w"], np.arange(4.0))
    assert meta == {"step": 1}


def test_a_folder_that_refuses_new_files_gives_one_line(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(CheckpointWriteError, match="read-only; no earlier checkpoint exists"):
        save_checkpoint(tmp_path / "c.h5", {"w": np.zeros(2)}, {})
    assert os.listdir(tmp_path) == []


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    path = tmp_path / "c.h5"
    save_checkpoint(path, {"w": np.zeros(2)}, {})
    for name in (".c.h5.abc123.tmp", ".c.h5.zz.tmp", ".other.h5.abc.tmp", "notes.tmp"):
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temporaries(path)
    assert sorted(os.path.basename(p) for p in removed) == [".c.h5.abc123.tmp", ".c.h5.zz.tmp"]
    assert sorted(os.listdir(tmp_path)) == [".other.h5.abc.tmp", "c.h5", "notes.tmp"]
