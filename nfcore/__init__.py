"""nfcore: normalizing flows with fast invertible k×k convolutions, on NumPy/CuPy and Numba."""
from .backend import get_array_module, get_backend, set_backend, to_device, to_numpy
from .layers import CORNERS, FInCUnit, InvConv, Layer
from .layers import (ActNorm, AffineCoupling, Conv1x1, EmergingConv, GaussianPrior, Logit,
                     QuadCoupling, Split, Squeeze)
