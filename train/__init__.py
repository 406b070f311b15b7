"""Training: the command line (``python -m train.run``), checkpoints, sampling and evaluation."""
import os

# Here, before anything imports NumPy: OpenBLAS reads OPENBLAS_THREAD_TIMEOUT once, when NumPy
# loads it, and the command lines (python -m train.run, train.sample, train.evaluate) import this
# package first. 4 (2^4 cycles) makes OpenBLAS's idle workers sleep as soon as a product ends
# instead of busy-waiting (yielding) for ~0.1 s, which slowed the Numba kernels that follow on
# the same cores: a train step with BLAS on 2 threads took ~10% less time (nfcore/threads.py).
# A value the user set is kept.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
