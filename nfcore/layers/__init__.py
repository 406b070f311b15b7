"""Invertible layers, one per file, each with forward / inverse / backward."""
from .base import Layer, NonFiniteError, check_images
from .finc import FInCUnit
from .cinc import CInCConv
from .invconv import CORNERS, InvConv
from .actnorm import ActNorm
from .conv1x1 import Conv1x1
from .coupling import AffineCoupling, BlockCoupling
from .emerging import EmergingConv
from .logit import Logit
from .prior import GaussianPrior
from .quad import QuadCoupling
from .split import Split
from .squeeze import Squeeze
