"""Every script in examples/ runs, at the small sizes its --small option picks, so that the
examples a user copies from never rot. Each runs in a process of its own, in a temporary folder
(they write their pictures into the current folder)."""
import os
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
# a tiny model on digits, enough for a checkpoint to sample and interpolate from
TINY_RUN = ["-m", "train.run", "--levels", "1", "--steps", "1", "--hidden", "8", "--max-steps", "2",
            "--eval-every", "1000", "--sample-every", "1000", "--blas-threads", "1"]


def run(arguments, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, *arguments], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def example(name):
    return os.path.join(EXAMPLES, name)


def test_every_example_is_tested():
    tested = {"invconv_inverse.py", "train_on_your_array.py", "sample_and_interpolate.py",
              "custom_layer.py"}
    assert {name for name in os.listdir(EXAMPLES) if name.endswith(".py")} == tested


def test_invconv_inverse(tmp_path):
    out = run([example("invconv_inverse.py"), "--small"], tmp_path)
    assert "InvConv(k=3) on 2×4×8×8" in out and "FInCUnit: logdet" in out and "dense_solve" in out


def test_train_on_your_array(tmp_path):
    out = run([example("train_on_your_array.py"), "--small"], tmp_path)
    assert "step 0: train bits/dim" in out and "test bits/dim" in out
    assert Image.open(tmp_path / "samples.png").size == (4 * 64 + 5 * 8, 4 * 64 + 5 * 8)


def test_sample_and_interpolate(tmp_path):
    run([*TINY_RUN, "--out", str(tmp_path / "run")], ROOT)
    out = run([example("sample_and_interpolate.py"), str(tmp_path / "run" / "checkpoint.h5"),
               str(tmp_path)], tmp_path)
    assert "16 samples, estimated rounding error" in out
    ends_error = float(out.split("ends off by ")[1].split()[0])
    assert ends_error < 1e-4
    for name in ("samples.png", "interpolate.png"):
        with Image.open(tmp_path / name) as picture:
            picture.verify()


def test_the_readme_python_quick_start(tmp_path):
    """The README's Python block, as printed, with its training loop cut to 3 steps."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = readme.split("## Quick start: Python")[1].split("```python\n")[1].split("```")[0]
    assert "for step in range(300):" in block
    script = tmp_path / "quick_start.py"
    script.write_text(block.replace("for step in range(300):", "for step in range(3):")
                      + "\nassert samples.shape == (16, 1, 8, 8) and np.isfinite(loss)\nprint('ok')\n")
    out = run([str(script)], tmp_path)
    assert "dense_solve" in out and out.strip().endswith("ok")


def test_custom_layer(tmp_path):
    out = run([example("custom_layer.py"), "--small"], tmp_path)
    assert "LeakyFlow: inverse" in out and "AffineCoupling: inverse" in out
