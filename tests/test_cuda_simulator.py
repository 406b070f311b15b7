"""Runs the GPU test suite (tests/gpu) under Numba's CUDA simulator, in its own process.

NUMBA_ENABLE_CUDASIM must be set before Numba is imported, so it cannot be switched on inside
this process; a child pytest does it. This keeps one test command for every machine: without a
GPU the CUDA kernels are still checked against the CPU kernels here, on tiny shapes.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cuda_kernels_under_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "gpu")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) > 0, output[-2000:]
    assert "failed" not in output.splitlines()[-1], output[-2000:]
