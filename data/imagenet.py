"""Downsampled ImageNet (Chrabaszcz et al. 2017) at 32×32 or 64×64, from the official npz batches.

Train: ``train_data_batch_1.npz`` … ``train_data_batch_10.npz``; test: ``val_data.npz`` (the
50000 validation images, which the flow papers report their test bits/dim on). Each file holds
``data``, a (N, 3·s·s) uint8 array, one row per image in channel-major order (all red values,
then green, then blue, each row-major), so a row reshapes to (3, s, s) directly.

The files are looked for in ``data_dir`` and in its immediate subfolders, so the unpacked
official zips (``Imagenet32_train_npz/``, ``Imagenet32_val_npz/``, ...) can sit side by side.
The full train set is large (3.9 GB at 32×32, 15.7 GB at 64×64): the output array is allocated
once from the files' headers and filled batch by batch, never concatenated.
"""
import os

import numpy as np

TRAIN_FILES = [f"train_data_batch_{i}.npz" for i in range(1, 11)]
TEST_FILES = ["val_data.npz"]
SIZES = (32, 64)


def find_file(data_dir, name):
    """``data_dir/name`` or ``data_dir/<subfolder>/name`` (subfolders in sorted order)."""
    candidates = [os.path.join(data_dir, name)]
    if os.path.isdir(data_dir):
        for entry in sorted(os.listdir(data_dir)):
            candidates.append(os.path.join(data_dir, entry, name))
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"downsampled-ImageNet file missing: {os.path.join(data_dir, name)} "
                            f"(looked in that folder and its subfolders)")


def _data_header(path, size):
    """Shape of the ``data`` array in an npz file, read from its .npy header only."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = npz.files
            if "data" in names:
                with npz.zip.open("data.npy") as member:
                    version = np.lib.format.read_magic(member)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(member)
    except Exception as error:  # not a zip, a .npy instead of an .npz, a cut-off file ...
        raise ValueError(f"{path}: not a readable npz file ({error})") from error
    if "data" not in names:
        raise ValueError(f"{path}: no 'data' array (found {names})")
    row = 3 * size * size
    if dtype != np.uint8 or len(shape) != 2 or shape[1] != row:
        raise ValueError(f"{path}: 'data' should be uint8 of shape (N, {row}) for {size}×{size} "
                         f"images, got {dtype} {shape}")
    return shape


def _read_batches(paths, size):
    counts = [_data_header(path, size)[0] for path in paths]
    images = np.empty((sum(counts), 3, size, size), dtype=np.uint8)
    start = 0
    for path, count in zip(paths, counts):
        try:
            with np.load(path) as npz:
                data = npz["data"]
        except Exception as error:
            raise ValueError(f"{path}: the 'data' array cannot be read ({error})") from error
        images[start:start + count] = data.reshape(count, 3, size, size)
        start += count
    return images


def load_imagenet(data_dir, size):
    """(train, test): uint8 arrays of shape (N, 3, size, size), size 32 or 64."""
    if size not in SIZES:
        raise ValueError(f"downsampled ImageNet comes in sizes {SIZES}, not {size}")
    train_paths = [find_file(data_dir, name) for name in TRAIN_FILES]
    test_paths = [find_file(data_dir, name) for name in TEST_FILES]
    return _read_batches(train_paths, size), _read_batches(test_paths, size)
