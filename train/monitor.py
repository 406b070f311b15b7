"""The reconstruction check of a training run: at every evaluation, how far the model's inverse
is from exact on real data.

    recon_error = max |decode(encode(x)) − x|     over a fixed test batch x (dequantized, in [−0.5, 0.5))

A well-conditioned float32 flow gives about 1e-6. The masked convolutions' inverse is a
recursion over anti-diagonals whose rounding errors grow geometrically once their off-centre
taps grow (nfcore/conditioning.py), so a model can drift, while training, into one whose
inverse (sampling, the memory-saving backward) returns finite, wrong numbers with normal-looking
bits/dim. Past ``threshold`` the run prints a warning; with ``stop`` it ends, keeping the last
checkpoint. The default threshold, 1e-3, is a quarter of an 8-bit quantization step (1/256).
"""
import numpy as np

from data import preprocess
from nfcore.backend import to_device
from nfcore.conditioning import round_trip_error

RECON_THRESHOLD = 1e-3


def reconstruction_batch(test_images, batch_size, n_bits, seed):
    """The fixed test batch of the check: the first ``batch_size`` test images, dequantized with
    noise from ``default_rng([seed, 5])`` (the same batch at every evaluation and on resume)."""
    rng = np.random.default_rng([seed, 5])
    return to_device(preprocess(test_images[:batch_size], n_bits, rng))


def check_reconstruction(flow, x, threshold=RECON_THRESHOLD):
    """(recon_error, warning): the error on x, and a one-line warning past ``threshold``
    (None below it). NaN/Inf in the round trip count as an infinite error."""
    error = round_trip_error(flow, x)
    if error <= threshold:
        return error, None
    return error, (f"warning: recon_error {error:.1e} > {threshold:g}: decode(encode(x)) is off by "
                   f"more than the threshold; the model's inverse (sampling, --recompute) is "
                   f"ill-conditioned (see nfcore/conditioning.py; --guard bounds the masked "
                   f"convolutions, --scale-bound the couplings)")
