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


def test_the_command_lines_let_openblas_workers_sleep_at_once():
    """Importing train (as every CLI does first) makes OpenBLAS's idle workers sleep right after
    a product: the CPU time burnt in the 0.2 s after one is ~0 (~0.1 s per worker otherwise).
    The probe is tests/test_fused_import_config.py's, with train imported instead of nfcore."""
    from tests.test_fused_import_config import idle_cpu
    _, threads, burnt = idle_cpu(
        "import train\nassert 'numpy' not in sys.modules, "
        "'train imports NumPy before setting OPENBLAS_THREAD_TIMEOUT'", environment_kept=False)
    if threads < 2:
        import pytest
        pytest.skip("BLAS runs on one thread here: no idle workers to check")
    assert burnt < 0.03, f"OpenBLAS's workers burnt {burnt} s of CPU while idle"


def test_a_libgomp_loaded_before_nfcore_is_reported():
    """scikit-learn's OpenMP code brings its own libgomp; loaded before nfcore, it is the one
    Numba must use, with the default long spin: importing nfcore then warns."""
    import os
    env = {key: value for key, value in os.environ.items()
           if key not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}

    def run(code):
        return subprocess.run([sys.executable, "-c", "import warnings; "
                               "warnings.simplefilter('error'); " + code],
                              env=env, capture_output=True, text=True, timeout=120)

    late = run("import sklearn.datasets; import nfcore")
    assert late.returncode != 0 and "loaded before nfcore" in late.stderr
    first = run("import nfcore; import sklearn.datasets")
    assert first.returncode == 0, first.stderr
