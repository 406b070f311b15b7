"""``import nfcore`` in a script gives the command lines' thread configuration (issue 21, part
4): OpenBLAS's idle workers sleep at once after a product when nfcore is imported before NumPy,
BLAS runs on all cores, and the environment is left as it was found. Each case in a fresh
interpreter: OpenBLAS reads OPENBLAS_THREAD_TIMEOUT once, when NumPy loads it."""
import os
import subprocess
import sys

import pytest

IDLE_CPU_AFTER_A_PRODUCT = """
import os, sys, time
before = dict(os.environ)
{imports}
{environment_check}
import numpy as np, threadpoolctl
threads = [info["num_threads"] for info in threadpoolctl.threadpool_info()
           if info["user_api"] == "blas"]
m = np.ones((512, 512), dtype=np.float32)
m @ m
burnt = []
for _ in range(3):
    time.sleep(0.2)
    m @ m
    start = time.process_time()
    time.sleep(0.2)
    burnt.append(time.process_time() - start)
print(min(threads), max(threads), min(burnt))
"""


def idle_cpu(imports, environment_kept=True):
    """(least and most BLAS threads, least CPU seconds burnt in the 0.2 s after a product) in a
    fresh interpreter that runs ``imports`` first; with ``environment_kept`` it also checks
    that they left os.environ as it was (nfcore does; train sets OPENBLAS_THREAD_TIMEOUT)."""
    check = ('assert dict(os.environ) == before, "importing nfcore changed the environment"'
             if environment_kept else "")
    env = {key: value for key, value in os.environ.items()
           if key not in ("OPENBLAS_THREAD_TIMEOUT", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    code = IDLE_CPU_AFTER_A_PRODUCT.format(imports=imports, environment_check=check)
    result = subprocess.run([sys.executable, "-c", code],
                            env=env, capture_output=True, text=True, timeout=180,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr
    low, high, burnt = result.stdout.split()
    return int(low), int(high), float(burnt)


def test_import_nfcore_first_lets_openblas_workers_sleep_and_uses_every_core():
    low, high, burnt = idle_cpu("import nfcore\nassert 'numpy' in sys.modules")
    assert low == high == os.cpu_count()           # numpy's and scipy's OpenBLAS, all cores
    if low < 2:
        pytest.skip("one core: no idle BLAS workers to check")
    assert burnt < 0.03, f"OpenBLAS's workers burnt {burnt} s of CPU while idle"


def test_numpy_first_leaves_the_environment_alone():
    """NumPy loaded first: nfcore cannot change OpenBLAS any more and does not try (the
    docstring says what a script must do); the environment stays as it was."""
    low, high, _ = idle_cpu("import numpy\nimport nfcore")
    assert low == high == os.cpu_count()


def test_a_timeout_the_user_set_is_kept():
    code = ("import os; os.environ['OPENBLAS_THREAD_TIMEOUT'] = '7'; import nfcore; "
            "print(os.environ['OPENBLAS_THREAD_TIMEOUT'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["7"]
