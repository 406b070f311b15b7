"""The objective of a flow on n_bits-bit images: bits per dimension.

For dequantized images x (docs/design.md, data/dequantize.py) with D = C·H·W dimensions, the flow's
change of variables gives log p(x) = log p(z) + logdet (natural logs), and the discrete
images' negative log-likelihood per dimension, in bits, is::

    bpd = (−log p(z) − logdet + D · n_bits · ln 2) / (D · ln 2)
"""
import math

import numpy as np


def check_n_bits(n_bits):
    """Raise ValueError unless ``n_bits`` is an integer from 1 to 8 (bits kept per pixel)."""
    if not isinstance(n_bits, (int, np.integer)) or not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be an integer from 1 to 8, got {n_bits!r}")


def bits_per_dim(log_prob_z, logdet, n_dims, n_bits):
    """Per-sample bits/dim from per-sample ``log_prob_z`` and ``logdet`` (natural logs)."""
    check_n_bits(n_bits)
    if not isinstance(n_dims, (int, np.integer)) or n_dims < 1:
        raise ValueError(f"n_dims must be a positive integer (C·H·W), got {n_dims!r}")
    nats = -log_prob_z - logdet + n_dims * n_bits * math.log(2.0)
    return nats / (n_dims * math.log(2.0))
