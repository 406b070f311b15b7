"""nfcore: normalizing flows with fast invertible k×k convolutions, on NumPy/CuPy and Numba."""
# First, before any Numba kernel can run: start Numba's thread pool with its OpenMP workers
# spinning only briefly after each kernel, so that they do not keep the cores from BLAS's
# threads (nfcore/threads.py says why and shows the measurements). libgomp reads its spin
# count once, when it is loaded, which happens when the pool starts.
from .threads import start_numba_threads

start_numba_threads()

from .backend import get_array_module, get_backend, set_backend, to_device, to_numpy
from .layers import CORNERS, FInCUnit, InvConv, Layer
from .layers import (ActNorm, AffineCoupling, CInCConv, Conv1x1, EmergingConv, GaussianPrior, Logit,
                     QuadCoupling, Split, Squeeze)
