"""MNIST from the official idx files (plain or gzipped).

An idx3 image file is a 16-byte header of four big-endian int32 — the magic number 2051, the
image count N, the row count and the column count — followed by N·rows·cols uint8 pixels,
image after image, each row-major. Only the images are read (a flow needs no labels):
``train-images-idx3-ubyte`` (60000 images) and ``t10k-images-idx3-ubyte`` (10000), each
found with or without a ``.gz`` suffix.
"""
import gzip
import os

import numpy as np

TRAIN_FILE = "train-images-idx3-ubyte"
TEST_FILE = "t10k-images-idx3-ubyte"
IMAGE_MAGIC = 2051
HEADER_BYTES = 16


def read_idx_images(path):
    """(N, 1, rows, cols) uint8 images of one idx3 file; gzipped if the name ends in .gz."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as file:
            content = file.read()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot be read ({error})") from error
    if len(content) < HEADER_BYTES:
        raise ValueError(f"{path}: too short for an idx header ({len(content)} bytes, "
                         f"expected at least {HEADER_BYTES})")
    magic, count, rows, cols = np.frombuffer(content[:HEADER_BYTES], dtype=">i4")
    if magic != IMAGE_MAGIC:
        raise ValueError(f"{path}: magic number {magic}, expected {IMAGE_MAGIC} "
                         f"(an idx3 image file)")
    expected = HEADER_BYTES + int(count) * int(rows) * int(cols)
    if len(content) != expected:
        raise ValueError(f"{path}: {len(content)} bytes, expected {expected} for "
                         f"{count} images of {rows}×{cols}")
    pixels = np.frombuffer(content, dtype=np.uint8, offset=HEADER_BYTES)
    return pixels.reshape(int(count), 1, int(rows), int(cols)).copy()


def find_idx_file(data_dir, name):
    """The path of ``name`` or ``name.gz`` in ``data_dir``; None if neither exists."""
    for candidate in (name, name + ".gz"):
        path = os.path.join(data_dir, candidate)
        if os.path.isfile(path):
            return path
    return None


def load_mnist(data_dir, download=False):
    """(train, test): uint8 arrays of shape (60000, 1, 28, 28) and (10000, 1, 28, 28).

    ``download``: fetch the official gzipped files into ``data_dir`` when they are missing.
    """
    paths = [find_idx_file(data_dir, name) for name in (TRAIN_FILE, TEST_FILE)]
    if None in paths and download:
        from .download import download_mnist
        download_mnist(data_dir)
        paths = [find_idx_file(data_dir, name) for name in (TRAIN_FILE, TEST_FILE)]
    for name, path in zip((TRAIN_FILE, TEST_FILE), paths):
        if path is None:
            raise FileNotFoundError(
                f"MNIST file missing: {os.path.join(data_dir, name)} (or {name}.gz); "
                f"pass download=True (--download) to fetch it")
    return read_idx_images(paths[0]), read_idx_images(paths[1])
