"""Which failures the command lines report in one line and which keep their traceback
(train/cli.py, ``is_expected``; issue 23): a user's mistake or the system's refusal is one line,
a bug (an error raised inside NumPy, a layer called in the wrong order) shows where it is."""
import numpy as np
import pytest

from nfcore.layers import ActNorm
from train import cli


def outcome(capsys, command):
    """("line", the error line) when run_command reported one line with status 1, else
    ("traceback", the exception that went through)."""
    try:
        cli.run_command(command, None)
    except SystemExit as stop:
        assert stop.code == 1
        error = capsys.readouterr().err
        assert error.startswith("error: ") and error.count("\n") == 1, error
        return "line", error.strip()
    except Exception as error:                          # noqa: BLE001
        return "traceback", error
    raise AssertionError("the command did not fail")


def own_check(args):
    cli.limit_blas_threads(0)                           # a ValueError raised by train/


def numpy_shape_error(args):
    return np.zeros((2, 3)) + np.zeros((2, 4))          # a ValueError raised inside NumPy


def backward_before_forward(args):
    layer = ActNorm(2)
    layer.backward(np.zeros((1, 2, 2, 2)), np.zeros(1))  # nfcore's RuntimeError: a misuse


def key_error(args):
    return {}["config"]


def disk_full(args):
    raise OSError(28, "No space left on device", "/some/file")


def too_big(args):
    return np.ones((10 ** 7, 10 ** 7))                  # numpy: 800 TB


def test_own_checks_and_the_systems_refusals_are_one_line(capsys):
    assert outcome(capsys, own_check) == ("line", "error: --blas-threads must be at least 1, "
                                                  "got 0")
    assert outcome(capsys, disk_full) == ("line", "error: /some/file: no space left on the device")
    kind, line = outcome(capsys, too_big)
    assert kind == "line" and line.startswith("error: out of memory: Unable to allocate")


@pytest.mark.parametrize("bug, kind", [(numpy_shape_error, ValueError),
                                       (backward_before_forward, RuntimeError),
                                       (key_error, KeyError)])
def test_a_bug_keeps_its_traceback(capsys, bug, kind):
    result, error = outcome(capsys, bug)
    assert result == "traceback" and type(error) is kind
    assert capsys.readouterr().err == ""                # no misleading "error:" line


def test_nfcore_traceback_shows_the_traceback_of_expected_errors_too(capsys, monkeypatch):
    monkeypatch.setenv("NFCORE_TRACEBACK", "1")
    result, error = outcome(capsys, own_check)
    assert result == "traceback" and "--blas-threads" in str(error)


def test_a_bug_inside_a_command_line_is_not_disguised(tmp_path, capsys, monkeypatch):
    """End to end: a NumPy shape error inside train.sample comes out as itself."""
    from train import run, sample

    out = tmp_path / "run"
    run.main(["--levels", "2", "--steps", "1", "--hidden", "8", "--batch-size", "32",
              "--max-steps", "1", "--out", str(out)])
    monkeypatch.setattr(sample, "save_samples", lambda *args, **kwargs: numpy_shape_error(None))
    with pytest.raises(ValueError, match="operands could not be broadcast"):
        sample.main(["--ckpt", str(out / "checkpoint.h5"), "--out", str(tmp_path / "s.png")])


def test_no_gpu_is_one_line(capsys):
    pytest.importorskip("numpy")
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here")
    except ImportError:
        pass
    import nfcore

    kind, line = outcome(capsys, lambda args: nfcore.set_backend("gpu"))
    nfcore.set_backend("cpu")
    assert kind == "line" and "the GPU backend needs CuPy" in line


def test_an_interrupt_inside_a_numba_kernel_is_still_an_interruption(capsys):
    """A signal handler that raises inside a Numba call surfaces as a SystemError whose context
    is the KeyboardInterrupt (or cli.Terminated); the command line treats it as the interrupt:
    one line and status 130 (143), not a bug's traceback."""
    from train import cli

    def interrupted_inside_a_kernel(args):
        try:
            raise cli.Terminated()
        except KeyboardInterrupt:
            raise SystemError("CPUDispatcher(<function im2col_into>) returned a result with an "
                              "exception set")

    with pytest.raises(SystemExit) as stopped:
        cli.run_command(interrupted_inside_a_kernel, None)
    assert stopped.value.code == 143
    assert capsys.readouterr().err.strip() == "terminated (SIGTERM)"


def test_train_run_acts_on_a_signal_between_steps():
    """In train.run a signal only asks for a stop, acted on at the start of the next step (a
    handler that raised could raise inside a kernel)."""
    import signal

    from train import cli

    with cli.stop_requests() as requested:
        signal.raise_signal(signal.SIGTERM)              # noted, nothing raised here
        assert requested == [signal.SIGTERM]
        with pytest.raises(cli.Terminated):
            cli.raise_requested_stop(requested)
    cli.raise_requested_stop([])                          # none asked for: nothing


def test_an_own_check_of_the_module_run_with_dash_m_is_one_line(tmp_path):
    """``python -m train.run`` runs train/run.py as __main__: a ValueError of its own checks
    (--out naming a file) is still one line and exit status 1, as when main() is called from
    train.run (the module's name is read from __spec__ then)."""
    import subprocess
    import sys
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    done = subprocess.run([sys.executable, "-m", "train.run", "--out", str(a_file), "--steps",
                           "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"error: --out {a_file} is a file, not a folder"]
