"""From uint8 pixels to the continuous inputs of a flow and back, and the bits/dim objective.

Dequantization (Glow): keep the top ``n_bits`` bits of each pixel, add uniform noise to make
the data continuous, and center it::

    x = (floor(x_uint8 / 2^(8 − n_bits)) + u) / 2^n_bits − 0.5,     u ~ U[0, 1)

so x lies in [−0.5, 0.5). A density p(x) on this continuous x gives a lower bound on the
log-likelihood of the discrete images; per dimension, in bits, with the 2^n_bits scaling::

    bpd = (−log p(z) − logdet + D · n_bits · ln 2) / (D · ln 2),     D = C·H·W

where log p(x) = log p(z) + logdet is the flow's change of variables (natural logs).
"""
import numpy as np

from nfcore.backend import to_numpy
from nfcore.objective import bits_per_dim  # noqa: F401  (re-exported: data.bits_per_dim)
from nfcore.objective import check_n_bits


def preprocess(x, n_bits, rng):
    """float32 dequantized images in [−0.5, 0.5) from uint8 images ``x`` (any shape).

    ``rng``: a ``numpy.random.Generator`` that draws the noise u (one value per entry).
    """
    check_n_bits(n_bits)
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8:
        raise TypeError(f"x must be a uint8 NumPy array, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    levels = x >> (8 - n_bits)                      # floor(x / 2^(8 − n_bits))
    noise = rng.random(x.shape)                     # u ~ U[0, 1), float64
    return ((levels + noise) / 2 ** n_bits - 0.5).astype(np.float32)


def preprocess_rows(x, n_bits, seed, first_row):
    """``preprocess`` of uint8 images ``x`` (n, C, H, W) that are rows first_row … first_row + n − 1
    of a batch whose noise a fresh ``default_rng(seed)`` draws for the whole batch at once.

    preprocess draws one float64, i.e. one 64-bit PCG64 output, per entry in C order, so the
    generator is advanced past the first_row·C·H·W entries of the rows before: the result
    equals those rows of the whole batch's preprocess, bit for bit, without drawing the others'
    noise (each rank of a data-parallel job draws its rows only).
    """
    rng = np.random.default_rng(seed)
    if not isinstance(rng.bit_generator, np.random.PCG64):
        raise RuntimeError("preprocess_rows relies on default_rng being PCG64")
    rng.bit_generator.advance(first_row * int(np.prod(x.shape[1:])))
    return preprocess(x, n_bits, rng)


def postprocess(x, n_bits):
    """uint8 images from dequantized ``x``: the level floor((x + 0.5) · 2^n_bits), clipped to
    0 … 2^n_bits − 1, scaled back to 0..255. Undoes ``preprocess`` up to its noise (a value
    that float32 rounding put exactly on the upper edge of its bin reads as the next level).
    """
    check_n_bits(n_bits)
    x = to_numpy(x).astype(np.float64)           # CuPy samples come back to the host
    levels = np.clip(np.floor((x + 0.5) * 2 ** n_bits), 0, 2 ** n_bits - 1)
    return (levels * 2 ** (8 - n_bits)).astype(np.uint8)
