"""nfcore: normalizing flows with fast invertible k×k convolutions, on NumPy/CuPy and Numba.

Import nfcore before NumPy (or anything that loads it: numba, scipy, torch), or export OPENBLAS_THREAD_TIMEOUT=4 before Python starts: else OpenBLAS's idle workers busy-wait after every product and slow the Numba kernels (nfcore/threads.py).
"""
# First, before NumPy loads (if it has not yet): OpenBLAS's idle workers sleep at once after a
# product (OPENBLAS_THREAD_TIMEOUT, read when NumPy and SciPy load OpenBLAS; the environment is
# put back at the end of this file). Then, before any Numba kernel can run: start Numba's
# thread pool with its OpenMP workers spinning only briefly after each kernel, so that they do
# not keep the cores from BLAS's threads (nfcore/threads.py says why and shows the
# measurements). libgomp reads its spin count once, when it is loaded, which happens when the
# pool starts. BLAS runs on all cores (OpenBLAS's default), as in the command lines.
from .threads import openblas_idle_timeout, start_numba_threads

_restore_environment = openblas_idle_timeout()
start_numba_threads()

from .backend import get_array_module, get_backend, set_backend, to_device, to_numpy
from .layers import CORNERS, FInCUnit, InvConv, Layer
from .layers import (ActNorm, AffineCoupling, CInCConv, Conv1x1, EmergingConv, GaussianPrior, Logit,
                     QuadCoupling, Split, Squeeze)

_restore_environment()      # NumPy and SciPy are loaded: OpenBLAS has read the timeout
del _restore_environment
