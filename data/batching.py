"""Minibatches: the training batch of any step, and the test set in order.

Training (``Batches``): the batch of global step s is a pure function of (seed, s). Epoch e
takes the permutation ``default_rng([seed, 0, e])`` of the training set and cuts it into
batches of ``batch_size`` (the last short batch is left out, so every step sees
``batch_size`` images); the dequantization noise of step s comes from ``default_rng([seed, 1,
s])``. No RNG state needs saving: a resumed run sees exactly the batches and noise an
uninterrupted one would.

Evaluation (``iterate_test_batches``) walks the test set in order and covers every image (the
last batch may be shorter), as test bits/dim must be over the whole set.
"""
import numpy as np

from .dequantize import preprocess_rows


def _check_batch_size(batch_size):
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


class Batches:
    """``batches(step)``: the dequantized float32 training batch (batch_size, C, H, W) of a
    global step, from uint8 ``images`` (N, C, H, W), NumPy."""

    def __init__(self, images, batch_size, n_bits, seed):
        _check_batch_size(batch_size)
        if len(images) < batch_size:
            raise ValueError(f"the training set has {len(images)} images, fewer than "
                             f"--batch-size {batch_size}")
        self.images, self.batch_size, self.n_bits, self.seed = images, batch_size, n_bits, seed
        self.steps_per_epoch = len(images) // batch_size
        self._epoch, self._order = None, None

    def __call__(self, step, rows=None):
        """The batch of ``step``; ``rows`` (lo, hi): only its rows lo … hi − 1, with the same
        images and noise as in the whole batch (a rank's share in data-parallel training)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.images))
        chosen = self._order[index * self.batch_size:(index + 1) * self.batch_size]
        lo, hi = (0, self.batch_size) if rows is None else rows
        return preprocess_rows(self.images[chosen[lo:hi]], self.n_bits, [self.seed, 1, step], lo)


def iterate_test_batches(x, batch_size):
    """An iterator over ``x`` in order, in batches of ``batch_size`` (the last may be shorter)."""
    _check_batch_size(batch_size)
    return (x[start:start + batch_size] for start in range(0, len(x), batch_size))
