"""nfcore/threads.py: importing nfcore starts Numba's thread pool with a short OpenMP spin, and
leaves the environment as it found it (each case in a fresh interpreter: libgomp reads its
settings once per process)."""
import subprocess
import sys

CHECK = """
import os, numba
before = dict(os.environ)
import nfcore
assert dict(os.environ) == before, "importing nfcore changed the environment"
print(numba.threading_layer(), os.environ.get("GOMP_SPINCOUNT"))
"""


def run_check(env_extra):
    import os
    env = {key: value for key, value in os.environ.items()
           if key not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(env_extra)
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_import_starts_numba_threads_and_restores_the_environment():
    layer, spin = run_check({})
    assert layer in ("omp", "tbb", "workqueue")     # the pool is running: threading_layer() answers
    assert spin == "None"


def test_a_spin_count_the_user_set_is_kept():
    _, spin = run_check({"GOMP_SPINCOUNT": "5"})
    assert spin == "5"
