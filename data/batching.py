"""Minibatches: shuffled for training, in order for evaluation.

Training draws one permutation of the train set per epoch from a seeded
``numpy.random.Generator`` and cuts it into batches; with ``drop_last`` the final short batch
is left out so every step sees ``batch_size`` images. Evaluation walks the test set in order
and covers every image (the last batch may be shorter), as test bits/dim must be over the
whole set.
"""
import numpy as np


def _check_batch_size(batch_size):
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def iterate_minibatches(x, batch_size, rng, drop_last=True):
    """An iterator over one epoch of shuffled batches ``x[indices]`` of ``x`` (first axis).

    The permutation is drawn from ``rng`` when this function is called (not lazily), so
    ``rng``'s state just before the call fixes the epoch.
    """
    _check_batch_size(batch_size)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    order = rng.permutation(len(x))
    stop = len(x) - len(x) % batch_size if drop_last else len(x)
    return (x[order[start:start + batch_size]] for start in range(0, stop, batch_size))


def iterate_test_batches(x, batch_size):
    """An iterator over ``x`` in order, in batches of ``batch_size`` (the last may be shorter)."""
    _check_batch_size(batch_size)
    return (x[start:start + batch_size] for start in range(0, len(x), batch_size))
