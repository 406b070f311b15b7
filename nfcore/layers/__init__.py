"""Invertible layers, one per file, each with forward / inverse / backward."""
from .base import Layer, NonFiniteError, check_images
from .finc import FInCUnit
from .invconv import CORNERS, InvConv
