"""The embedded default data set: scikit-learn's bundled handwritten digits (no download).

``sklearn.datasets.load_digits()`` holds 1797 grayscale 8×8 images with values 0..16 (the
UCI "optdigits" set, shipped inside scikit-learn). They are rescaled to 0..255 uint8,
``round(v · 255 / 16)``, so that every loader hands out the same kind of images, and split
once with a fixed seeded permutation: the first 1500 images train, the other 297 test.
"""
import numpy as np

N_TRAIN = 1500
SPLIT_SEED = 0


def load_digits():
    """(train, test) uint8 arrays of shape (1500, 1, 8, 8) and (297, 1, 8, 8), same every call."""
    from sklearn.datasets import load_digits as sklearn_load_digits

    images = sklearn_load_digits().images                      # (1797, 8, 8) float, 0..16
    images = np.round(images * 255.0 / 16.0).astype(np.uint8)[:, None, :, :]
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    return images[order[:N_TRAIN]], images[order[N_TRAIN:]]
