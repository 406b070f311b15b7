"""How nfcore's two thread pools share the cores: Numba's kernels and BLAS's matrix products.

A training step alternates the two: a Numba parallel kernel (the masked convolutions, im2col,
col2im), then an OpenBLAS product (the coupling networks' convolutions), then a kernel again.
Each pool keeps its workers busy-waiting for a while after a call, in case another call comes
soon. Numba's ``omp`` threading layer (GNU OpenMP, libgomp) spins its workers for 300,000
``pause`` instructions by default: about 9 ms of a core after every kernel on the 2-core test
machine (CPU time burnt while the main thread sleeps right after one call). A 2-thread product
that starts while a Numba worker still spins gets half a core for one of its threads, and waits
for it: a train step ran 2-3 times slower with BLAS on 2 threads than on 1, hence the old
one-thread default of the command lines. (OpenBLAS's own workers spin too, but yield: see
"OpenBLAS's side" below.)

The fix: Numba's OpenMP workers spin only GOMP_SPINCOUNT = 1000 times (about 30 µs) before they
sleep, and BLAS runs on all cores. Back-to-back parallel regions (the inverse's anti-diagonal
schedule runs one per anti-diagonal) still find their workers awake; a product that comes after
a kernel finds the cores free. libgomp reads GOMP_SPINCOUNT once, when it is loaded, and Numba
loads it when its thread pool starts (the first parallel kernel, not ``import numba``). So
``start_numba_threads`` sets the variable, starts the pool right away (``numba.get_num_threads``
does), and restores the environment. ``nfcore/__init__.py`` calls it before any kernel can run.

**One libgomp per process.** Every copy of GNU OpenMP is named libgomp.so.1 to the dynamic
loader, so a process holds one: whichever library loads it first sets it up for all. PyTorch
bundles its own copy, but imported after nfcore it gets nfcore's (its workers then spin 1000
times too: a loop of its conv2d at the four bench/invconv.py shapes timed the same as in a
process of its own, within the machine's drift). Imported *before* nfcore, torch's copy, read
with the default 300,000 spins, is the one Numba gets, and nfcore's train steps ran 1.5-4×
slower (bench/flow_timing.py). ``start_numba_threads`` cannot change a runtime that is already
running, so it warns then: import nfcore first, or export GOMP_SPINCOUNT=1000. A GOMP_SPINCOUNT or OMP_WAIT_POLICY that the user set is kept, and another
threading layer (NUMBA_THREADING_LAYER=tbb or workqueue) is left alone.

Measured on the 2-core AMD EPYC VM, whose speed drifts by ±20% from minute to minute, so BLAS on
1 and 2 threads take turns, step by step, on one flow in one process (float32, 3×32×32, L=3,
K=4, width 64, B=64, FInC; median of 10 steps each, ms; three processes per setting)::

    Numba threading layer, setting          BLAS 1 thread    BLAS 2 threads   2 / 1, paired
    omp, libgomp's default (300,000 spins)  397  431  415    983  965 1003    2.44 2.29 2.19
    omp, GOMP_SPINCOUNT=1000 (nfcore's)     490  447  325    436  402  279    0.87 0.89 0.83
    omp, OMP_WAIT_POLICY=passive (0 spins)  465  467  310    394  414  255    0.83 0.88 0.82
    omp, GOMP_SPINCOUNT=10000               359  500  349    482  557  394    1.29 1.06 1.08
    workqueue (Numba's own pool, sleeps)    492  497  431    401  433  384    0.86 0.88 0.91

A Numba kernel and its two products, alternated 10 times (im2col of B=64, 16×16, 6 channels),
best of 10: libgomp's default 88-124 ms with BLAS on 2 threads against 61-85 ms on 1; with
1000 spins 52-63 ms on 2 threads. Workers that never spin cost instead where kernels are short
and many: the single-sample wavefront solve (bench/invconv.py, 16×16) took 0.37-0.54 ms with
libgomp's default, 0.80-1.30 ms passive, 0.53-0.61 ms with 1000 spins. Also tried: tbb (pip
install tbb), as fast as passive in the step but one more dependency; workqueue, which aborts
when two Python threads launch kernels at once.

**OpenBLAS's side.** OpenBLAS's idle workers busy-wait too, about 110 ms after each product,
calling sched_yield: they give way to a waiting thread, but not for free. Profiled, 3 steps
with BLAS on 2 threads spent 142 ms in col2im (43 ms with OPENBLAS_THREAD_TIMEOUT=4, 76 ms
with BLAS on 1 thread) and 81 ms in im2col (42 ms, 50 ms).
OPENBLAS_THREAD_TIMEOUT=4 makes them sleep at once. OpenBLAS reads it once, when NumPy loads
it (and SciPy's copy when SciPy loads it). ``openblas_idle_timeout`` sets it for the duration
of ``import nfcore`` when NumPy is not loaded yet (nfcore then loads NumPy, Numba and SciPy
itself) and puts the environment back afterwards; imported after NumPy (or Numba, SciPy,
torch...), nfcore cannot change it any more: a script then exports OPENBLAS_THREAD_TIMEOUT=4
before Python starts, or imports nfcore first. The command lines set it in
``train/__init__.py``, before anything imports NumPy. BLAS itself runs on all cores unless the
user limits it (OPENBLAS_NUM_THREADS, threadpoolctl, ``train.run --blas-threads``). Step with BLAS on 2
threads, median of 10 steps, five pairs of processes: 372 363 417 347 393 ms without, 329 342
368 327 346 ms with it (2 threads / 1 thread, paired: 0.84-0.96 without, 0.76-0.86 with).
"""
import os
import sys
import warnings

SPIN_COUNT = "1000"
OPENBLAS_TIMEOUT = "4"


def openblas_idle_timeout():
    """Set OPENBLAS_THREAD_TIMEOUT=4 now if NumPy is not loaded yet and the user did not set
    it (see "OpenBLAS's side" above); returns a function that puts the environment back, to
    call once NumPy and SciPy are loaded. Returns a no-op when it cannot or need not act."""
    if "numpy" in sys.modules or "OPENBLAS_THREAD_TIMEOUT" in os.environ:
        return lambda: None
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = OPENBLAS_TIMEOUT

    def restore():
        if os.environ.get("OPENBLAS_THREAD_TIMEOUT") == OPENBLAS_TIMEOUT:
            del os.environ["OPENBLAS_THREAD_TIMEOUT"]
    return restore


def gomp_loaded():
    """Is a GNU OpenMP runtime (libgomp) already in this process? (Linux; False elsewhere.)"""
    try:
        with open("/proc/self/maps") as maps:
            return any("libgomp" in line for line in maps)
    except OSError:
        return False


def start_numba_threads():
    """Start Numba's thread pool now, its OpenMP workers spinning only briefly (see above)."""
    import numba                         # here: importing it loads NumPy (see above)
    user_set = "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ
    if not user_set and gomp_loaded():
        warnings.warn("an OpenMP runtime (libgomp) was loaded before nfcore, by a library "
                      "imported first (torch, scikit-learn, ...): Numba's workers will spin "
                      "after every kernel and slow BLAS products down (train steps 1.5-4x "
                      "slower). Import nfcore first, or export GOMP_SPINCOUNT=1000 "
                      "(nfcore/threads.py)", RuntimeWarning, stacklevel=2)
    if not user_set:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    try:
        numba.get_num_threads()          # loads the threading layer (libgomp) and starts it
    finally:
        if not user_set:
            del os.environ["GOMP_SPINCOUNT"]
