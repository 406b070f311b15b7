"""The GPU proof script, bench/gpu_check.sh, rehearsed on a machine without a GPU.

``--simulate`` runs the script as on a GPU machine but with Numba's CUDA simulator and tiny
sizes: the kernel tests must pass and the parts that need CuPy must be reported as skipped.
Without --simulate and without a GPU, the check must fail (a machine that proves nothing must
not pass). bench/gpu_train.py, the training part, is rehearsed with the CPU on both sides.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

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
    for part in "cdef":
        assert section_status(report, part).startswith("skipped (needs CuPy"), report
    assert "## Summary" in report
    for part in "abcdef":
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


def test_gpu_train_rehearsed_cpu_against_cpu(tmp_path):
    """The training part's code on NumPy both sides: the tables come out, and two identical
    runs agree exactly (the GPU run compares the same numbers)."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_train.py"),
                             str(tmp_path), "--quick", "--against", "cpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one_step = [line for line in result.stdout.splitlines()
                if re.match(r"\s+float(32|64)\s+(finc|cinc|emerging|glow1x1)\s", line)]
    assert len(one_step) == 8 and all(" 0.0e+00 " in line and " ok " in line for line in one_step)
    assert "| digits | test |" in result.stdout
    assert re.search(r"\| digits \| test \| ([\d.]+) \| \1 \| 0\.0e\+00 \| ok \|", result.stdout)
