"""Loading a checkpoint is safe: nothing is allocated before it is checked (issue 23).

A checkpoint passed around between people may be damaged or hostile: a config edited to an
enormous model, or a dataset declared enormous (a chunked one holds only the chunks written, so
a 200 KB file can declare terabytes). ``load_flow`` checks the config within bounds, builds the
model, and reads only the arrays that model has, each after checking its shape and dtype from
the file's own description; every other dataset is ignored unread.
"""
import json
import os
import resource
import subprocess
import sys

import h5py
import numpy as np
import pytest

from nfcore.optim import Adam
from train.checkpoint import load_checkpoint
from train.session import (MAX_PARAMETERS, build_flow, load_flow, parameter_bound,
                           save_training_checkpoint)

CONFIG = dict(dataset="digits", image_shape=[1, 8, 8], levels=2, steps=1, hidden=8,
              invconv="finc", coupling="affine", k=3, seed=0, scale_bound=None, n_bits=4,
              batch_size=32, lr=1e-3, warmup=0, epochs=1, max_steps=5, eval_every=5,
              sample_every=5, max_grad_norm=50.0, ema=0.9, image_size=None, recompute=False,
              guard=None)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_checkpoint(path, config=CONFIG):
    flow = build_flow(config)
    flow.forward(np.random.default_rng(0).uniform(-0.5, 0.5, (4,) + tuple(config["image_shape"]))
                 .astype(np.float32))
    optimizer = Adam(flow.layers, lr=1e-3, ema_decay=config["ema"])
    optimizer.zero_grad()
    optimizer.step()
    save_training_checkpoint(path, flow, optimizer, {"config": config, "step": 1})
    return path


def edit_meta(path, **changes):
    """Rewrite the checkpoint's config with ``changes`` (what a hand edit would do)."""
    with h5py.File(path, "a") as file:
        meta = json.loads(file.attrs["meta"])
        meta["config"].update(changes)
        file.attrs["meta"] = json.dumps(meta)


def add_huge_dataset(path, name, shape=(10 ** 6, 10 ** 6)):
    """Replace (or add) ``name`` with a chunked float32 dataset of ``shape`` of which one
    element is written: the file stays small, the declared size is shape's."""
    with h5py.File(path, "a") as file:
        if name in file:
            del file[name]
        dataset = file.create_dataset(name, shape=shape, dtype=np.float32, chunks=(1, 1))
        dataset[0, 0] = 1.0


@pytest.fixture
def checkpoint(tmp_path):
    return write_checkpoint(str(tmp_path / "checkpoint.h5"))


def test_a_good_checkpoint_still_loads_with_its_ema(checkpoint):
    flow, meta, arrays = load_flow(checkpoint, weights="ema")
    assert meta["weights"] == "ema" and meta["step"] == 1
    np.testing.assert_array_equal(flow.layers[2].params["bias"], arrays["optim/ema/2/bias"])


@pytest.mark.parametrize("name", ["model/2/bias", "optim/m/2/bias", "state/2/initialized",
                                  "junk/x"])
def test_a_huge_declared_dataset_is_refused_or_ignored_unread(checkpoint, name):
    add_huge_dataset(checkpoint, name)
    assert os.path.getsize(checkpoint) < 1 << 20
    if name == "junk/x":                          # not the model's: ignored, never read
        flow, meta, arrays = load_flow(checkpoint)
        assert "junk/x" not in arrays
        return
    with pytest.raises(ValueError, match=f"array {name} has shape \\(1000000, 1000000\\), the "
                                         f"model built from its config expects"):
        load_flow(checkpoint)


def test_the_generic_reader_refuses_arrays_larger_than_the_file(checkpoint):
    add_huge_dataset(checkpoint, "junk/x", (40000, 40000))
    with pytest.raises(ValueError, match="declare .* bytes but the file holds"):
        load_checkpoint(checkpoint)


@pytest.mark.parametrize("changes, words", [
    (dict(hidden=10 ** 6), "hidden = 1000000"),
    (dict(image_shape=[1, 100000, 100000]), "image_shape = [1, 100000, 100000]"),
    (dict(k=10001), "k = 10001"),
    (dict(steps=10 ** 7), "steps = 10000000"),
    (dict(hidden=4096, steps=512), "parameters"),
    (dict(levels="2"), "levels = '2'"),
    (dict(invconv="magic"), "invconv = 'magic'"),
    (dict(batch_size=0), "batch_size = 0"),
])
def test_a_config_out_of_bounds_is_refused_before_anything_is_built(checkpoint, changes, words,
                                                                      monkeypatch):
    edit_meta(checkpoint, **changes)
    import train.session
    monkeypatch.setattr(train.session, "Flow", None)      # building one would fail loudly
    with pytest.raises(ValueError) as failure:
        load_flow(checkpoint)
    assert words in str(failure.value) and checkpoint in str(failure.value)


def test_links_and_non_numeric_arrays_are_refused(checkpoint, tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as file:
        file["w"] = np.zeros((1, 1))
    with h5py.File(checkpoint, "a") as file:
        del file["model/2/bias"]
        file["model/2/bias"] = h5py.ExternalLink(str(other), "w")
    with pytest.raises(ValueError, match="model/2/bias is a ExternalLink"):
        load_flow(checkpoint)
    with h5py.File(checkpoint, "a") as file:
        del file["model/2/bias"]
        file["model/2/bias"] = np.array([b"ab"] * 4)
    with pytest.raises(ValueError, match="model/2/bias has dtype"):
        load_flow(checkpoint)


def test_a_missing_layer_state_is_one_line_not_a_key_error(checkpoint):
    with h5py.File(checkpoint, "a") as file:
        del file["state/2/initialized"]
    with pytest.raises(ValueError, match="layer state state/2/initialized is missing"):
        load_flow(checkpoint)


@pytest.mark.parametrize("invconv, coupling, k, hidden", [
    ("finc", "affine", 3, 16), ("finc", "quad", 7, 128), ("cinc", "quad", 5, 16),
    ("cinc", "affine", 1, 128), ("emerging", "affine", 3, 16), ("emerging", "quad", 5, 128),
    ("glow1x1", "quad", 1, 16), ("glow1x1", "affine", 3, 128)])
def test_the_parameter_bound_bounds_the_real_count(invconv, coupling, k, hidden):
    config = dict(CONFIG, image_shape=[3, 16, 16], levels=3, steps=2, hidden=hidden,
                  invconv=invconv, coupling=coupling, k=k)
    exact = build_flow(config).n_params()
    assert exact <= parameter_bound(config) <= 1.2 * exact
    paper = dict(config, image_shape=[3, 64, 64], levels=4, steps=32, hidden=512)
    assert parameter_bound(paper) < MAX_PARAMETERS      # the published models load


MEMORY_LIMIT = 1 << 30      # bytes of address space above what the started tool already uses

LIMITED = """
import resource, sys
import numpy, h5py, numba, PIL, train.sample       # what the tool imports, before the limit
with open("/proc/self/statm") as file:
    used = int(file.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + {limit}, used + {limit}))
train.sample.main(sys.argv[1:])
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux's /proc")
@pytest.mark.parametrize("name", ["model/2/bias", "junk/x"])
def test_sample_under_a_memory_limit_ends_in_one_line(checkpoint, tmp_path, name):
    """The reported case, end to end: a (40000, 40000) float32 dataset (6.4 GB declared) in a
    small file, train.sample under a memory limit: one error line (or, for a dataset the model
    does not have, the samples), never a MemoryError traceback."""
    add_huge_dataset(checkpoint, name, (40000, 40000))
    out = tmp_path / "s.png"
    result = subprocess.run(
        [sys.executable, "-c", LIMITED.format(limit=MEMORY_LIMIT), "--ckpt", checkpoint,
         "--n", "2", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env=dict(os.environ, OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1"))
    if name == "junk/x":
        assert result.returncode == 0, result.stderr
        assert out.exists()
        return
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "model/2/bias has shape (40000, 40000)" in result.stderr


def test_a_folder_given_as_the_checkpoint_is_named_as_a_folder(tmp_path):
    with pytest.raises(ValueError, match="is a folder: give the checkpoint file in it"):
        load_checkpoint(tmp_path)


# ---- train.run writes only checkpoints it can load back -----------------------------------

@pytest.mark.parametrize("options, words", [
    (["--k", "65"], "has k = 65, expected an integer from 1 to 63 (--k)"),
    (["--guard", "65"], "has guard = 65, expected an integer from 1 to 64 (--guard)"),
    (["--levels", "11"], "has levels = 11, expected an integer from 1 to 10 (--levels)"),
    (["--batch-size", "100000"], "has batch_size = 100000, expected an integer from 1 to 65536 "
                                 "(--batch-size)"),
    (["--image-size", "5000", "--dataset", "folder"],
     "has image_size = 5000, expected an integer from 1 to 4096 (--image-size)"),
    (["--hidden", "16384", "--steps", "1024"], "describes a model of up to "),
], ids=lambda value: value[1] if isinstance(value, list) else None)
def test_train_run_refuses_a_config_its_checkpoint_could_not_be_loaded_with(tmp_path, capsys,
                                                                           options, words):
    """The load limits (CONFIG_LIMITS, MAX_PARAMETERS) checked at start-up, in one line, before
    anything is trained or written (--k 65 and --guard 65 were accepted, and the checkpoints
    they wrote refused by every tool and by --resume; --levels 11 and --batch-size 100000 failed
    later with other messages, and --image-size 5000 would have resized every image first)."""
    from train import run
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        run.main(["--steps", "1", "--hidden", "8", "--max-steps", "1", "--eval-every", "1000",
                  "--sample-every", "1000", "--data-dir", str(tmp_path / "no_images"),
                  "--out", str(out), *options])
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: the run's config " + words), err
    assert "could not be loaded back (the limits of train/session.py" in err
    assert not any(name.endswith((".h5", ".json", ".jsonl")) for name in os.listdir(out))


def test_train_run_resumed_with_an_option_beyond_the_load_limits_is_refused(tmp_path, capsys):
    from train import run
    out = str(tmp_path / "run")
    options = ["--levels", "2", "--steps", "1", "--hidden", "8", "--batch-size", "32",
               "--eval-every", "1000", "--sample-every", "1000", "--out", out]
    run.main(options + ["--max-steps", "2"])
    def written():                                   # the lock file aside: every run takes it
        return {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)
                if name != ".run.lock"}

    before = written()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run.main(options + ["--max-steps", "4", "--resume", "--guard", "65"])
    assert stop.value.code == 1
    assert capsys.readouterr().err.startswith("error: the run's config has guard = 65, expected "
                                              "an integer from 1 to 64 (--guard)")
    assert written() == before
    load_flow(os.path.join(out, "checkpoint.h5"))
