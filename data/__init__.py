"""Data: loaders for each data set, dequantization and bits/dim, minibatches.

    train, test = load_dataset("cifar10", data_dir="datasets/cifar10", download=True)
    for batch in iterate_minibatches(train, 64, rng):
        x = preprocess(batch, n_bits=8, rng=rng)      # float32 in [-0.5, 0.5)
"""
from .batching import iterate_minibatches, iterate_test_batches
from .dequantize import bits_per_dim, postprocess, preprocess
from .loaders import DATASETS, default_data_dir, load_dataset

__all__ = ["load_dataset", "default_data_dir", "DATASETS", "preprocess", "postprocess",
           "bits_per_dim", "iterate_minibatches", "iterate_test_batches"]
