"""The GPU proof script, bench/gpu_check.sh, rehearsed on a machine without a GPU.

``--simulate`` runs the script as on a GPU machine but with Numba's CUDA simulator and tiny
sizes: the kernel tests must pass and the parts that need CuPy must be reported as skipped.
Without --simulate and without a GPU, the check must fail (a machine that proves nothing must
not pass). The comparisons of the training parts (bench/gpu_train.py, part e;
bench/gpu_distributed.py, part g) are tested against a stand-in device that is wrong by a little:
they must say FAIL (a CPU compared with itself agrees whatever the comparison does). Part g's
runs are rehearsed with --distributed on the CPU.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def run_check(*args, timeout=300):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def section_status(report, part):
    """The status written in the report's heading of ``part`` ("passed", "skipped (...)", ...)."""
    match = re.search(rf"^## {part}\. .*?: (passed|skipped.*|FAILED.*|TIMED OUT.*) \(\d+ s\)$",
                      report, re.MULTILINE)
    assert match, f"no section {part} in the report:\n{report}"
    return match.group(1)


def test_simulate_runs_the_kernel_tests_and_skips_what_needs_cupy(tmp_path):
    result = run_check("--simulate", tmp_path / "out")
    report = (tmp_path / "out" / "report.md").read_text()
    assert result.returncode == 0, result.stderr + report
    assert section_status(report, "a") == "passed"
    assert section_status(report, "b") == "passed"
    assert "tests/gpu: CUDA simulator" in report
    passed = re.search(r"(\d+) passed", (tmp_path / "out" / "b.log").read_text())
    assert passed and int(passed.group(1)) > 0
    for part in "cdefg":
        assert section_status(report, part).startswith("skipped (needs CuPy"), report
    assert "distributed training on one GPU (NCCL)" in report
    assert "## Summary" in report
    for part in "abcdefg":
        assert (tmp_path / "out" / f"{part}.log").exists()


def test_without_a_gpu_the_real_check_fails(tmp_path):
    from numba import cuda
    if cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_check("--quick", tmp_path / "out", timeout=120)
    report = (tmp_path / "out" / "report.md").read_text()
    assert result.returncode == 1
    assert section_status(report, "a") == "FAILED (exit status 1)"
    assert "Numba sees no CUDA GPU" in (tmp_path / "out" / "a.log").read_text()
    assert section_status(report, "b").startswith("FAILED (needs CuPy")


def test_command_line_errors():
    no_out = run_check("--simulate", timeout=30)
    assert no_out.returncode == 2 and "error: give an OUT_DIR" in no_out.stderr
    unknown = run_check("--fast", "somewhere", timeout=30)
    assert unknown.returncode == 2 and "error: unknown option --fast" in unknown.stderr


def test_gpu_train_one_step_flags_a_device_that_disagrees(monkeypatch, capsys):
    """Part e's one-step table with a stand-in device whose gradients are off by 10× the
    dtype's tolerance in one parameter: every row says FAIL; the same stand-in without the
    error passes."""
    from bench import gpu_train
    real = gpu_train.one_step
    fault = {}

    def stand_in(invconv, dtype, backend, params=None):
        loss, z, grads, params_out = real(invconv, dtype, "cpu", params)
        if backend == "stand-in" and fault:
            key = max(grads, key=lambda name: float(np.abs(grads[name]).max()))
            grads[key] = grads[key] * (1 + fault["factor"] * gpu_train.TOLERANCE[np.dtype(dtype)])
        return loss, z, grads, params_out

    monkeypatch.setattr(gpu_train, "one_step", stand_in)
    monkeypatch.setattr(gpu_train, "STEP_KINDS", ("finc",))
    assert gpu_train.check_one_step("stand-in")
    assert capsys.readouterr().out.count(" ok ") == 2
    fault["factor"] = 10.0
    assert not gpu_train.check_one_step("stand-in")
    rows = [line for line in capsys.readouterr().out.splitlines() if " finc " in line]
    assert len(rows) == 2 and all("FAIL" in row for row in rows), rows


def fake_metrics(steps, scale=1.0):
    """metrics.jsonl records of a 5-step run with --eval-every 1, bits/dim times ``scale``."""
    records = [{"step": s, "test_bpd": (4.4 - 0.03 * s) * scale, "recon_error": 1e-6}
               for s in range(1, steps + 1)]
    records.insert(-1, {"step": steps, "train_bpd": 4.35 * scale, "images_per_s": 100.0,
                        "allreduce_s": 1e-4})
    return records


def test_gpu_train_training_table_flags_a_device_that_disagrees(monkeypatch, tmp_path, capsys):
    """Part e's train.run table: a compared run 2e-4 off (twice the 1e-4 tolerance) says FAIL,
    one 1e-6 off passes."""
    from bench import gpu_train
    for scale, expected in ((1 + 1e-6, True), (1 + 2e-4, False)):
        monkeypatch.setattr(gpu_train, "train_run", lambda argv, scale=scale: fake_metrics(
            5, scale if argv[argv.index("--backend") + 1] == "stand-in" else 1.0))
        assert gpu_train.check_training(str(tmp_path), "stand-in", quick=True) is expected
        out = capsys.readouterr().out
        assert "| digits | test |" in out and ("| ok |" in out) is expected
        assert ("| FAIL |" in out) is not expected


def test_gpu_distributed_comparison_flags_a_disagreement():
    """Part g's comparison: every step's test bits/dim and the train bits/dim within 1e-4
    relative; a value 2e-4 off, a missing step or a missing value fails."""
    from bench import gpu_distributed
    reference = fake_metrics(5)
    rows, ok = gpu_distributed.compare(reference, fake_metrics(5, 1 + 1e-6))
    assert ok and len(rows) == 6 and all(row[-1] for row in rows)
    rows, ok = gpu_distributed.compare(reference, fake_metrics(5, 1 + 2e-4))
    assert not ok and not any(row[-1] for row in rows)
    off_once = fake_metrics(5)
    off_once[2]["test_bpd"] *= 1 + 2e-4
    rows, ok = gpu_distributed.compare(reference, off_once)
    assert not ok and [row[0] for row in rows if not row[-1]] == ["test, step 3"]
    assert not gpu_distributed.compare(reference, fake_metrics(5)[1:])[1]     # step 1 missing
    assert not gpu_distributed.compare(fake_metrics(4), fake_metrics(4))[1]   # 4 steps, not 5


def test_gpu_distributed_rehearsed_on_the_cpu(tmp_path):
    """Part g's script end to end with mpiexec -n 1 ... --distributed --backend cpu (the
    rehearsal: the GPU's place taken by the distributed CPU path)."""
    from bench.gpu_distributed import mpiexec
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install -e \".[mpi]\")")
    if mpiexec() is None:
        pytest.skip("no mpiexec found (pip install -e \".[mpi]\" brings MPICH's)")
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_distributed.py"),
                             str(tmp_path), "--against", "cpu"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| test, step")]
    assert len(rows) == 5 and all(line.endswith("| ok |") for line in rows), result.stdout
    assert "mpiexec -n 1" in result.stdout and "allreduce_s logged by the distributed run: [" \
        in result.stdout
