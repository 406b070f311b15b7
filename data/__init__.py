"""Data: loaders for each data set, dequantization and bits/dim, minibatches.

    train, test = load_dataset("cifar10", data_dir="datasets/cifar10", download=True)
    batches = Batches(train, batch_size=64, n_bits=8, seed=0)
    x = batches(step)                       # float32 in [-0.5, 0.5), the same for every run
"""
from .batching import Batches, iterate_test_batches
from .dequantize import bits_per_dim, postprocess, preprocess, preprocess_rows
from .loaders import DATASETS, default_data_dir, load_dataset

__all__ = ["load_dataset", "default_data_dir", "DATASETS", "preprocess", "preprocess_rows", "postprocess",
           "bits_per_dim", "Batches", "iterate_test_batches"]
