"""MNIST and Fashion-MNIST from the official idx files (plain or gzipped).

An idx3 image file is a 16-byte header of four big-endian int32 — the magic number 2051, the
image count N, the row count and the column count — followed by N·rows·cols uint8 pixels,
image after image, each row-major. Only the images are read (a flow needs no labels):
``train-images-idx3-ubyte`` (60000 images) and ``t10k-images-idx3-ubyte`` (10000), each
found with or without a ``.gz`` suffix. Fashion-MNIST (Zalando) uses the same file names and
format; without a folder given, its files are looked for first in the folder Debian's package
``dataset-fashion-mnist`` installs them in, then in the cache folder.
"""
import gzip
import os

import numpy as np

from .download import download_fashion_mnist, download_mnist

TRAIN_FILE = "train-images-idx3-ubyte"
TEST_FILE = "t10k-images-idx3-ubyte"
IMAGE_MAGIC = 2051
HEADER_BYTES = 16
# Where Debian's package dataset-fashion-mnist installs the gzipped idx files.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"


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


def find_idx_pair(folders):
    """(train path, test path) in the first of ``folders`` holding both image files, or None."""
    for folder in folders:
        paths = [find_idx_file(folder, name) for name in (TRAIN_FILE, TEST_FILE)]
        if None not in paths:
            return paths
    return None


def load_idx_dataset(folders, title, remedies, fetch=None):
    """(train, test) uint8 images of the first of ``folders`` holding both idx image files.

    ``fetch``: None, or a function downloading the files into a folder; it is called with the
    last of ``folders`` when none holds them. ``remedies``: how to get the files, for the error
    raised (FileNotFoundError naming every folder searched) when they are still missing.
    """
    paths = find_idx_pair(folders)
    if paths is None and fetch is not None:
        fetch(folders[-1])
        paths = find_idx_pair(folders[-1:])
    if paths is None:
        raise FileNotFoundError(
            f"{title} files missing: no folder holds both {TRAIN_FILE}[.gz] and "
            f"{TEST_FILE}[.gz]; searched {', '.join(folders)}. {remedies}")
    return read_idx_images(paths[0]), read_idx_images(paths[1])


def load_mnist(data_dir, download=False):
    """(train, test): uint8 arrays of shape (60000, 1, 28, 28) and (10000, 1, 28, 28).

    ``download``: fetch the official gzipped files into ``data_dir`` when they are missing.
    """
    return load_idx_dataset([data_dir], "MNIST", "Pass download=True (--download) to fetch them.",
                            download_mnist if download else None)


def fashion_mnist_folders(data_dir, cache_dir):
    """The folders searched for Fashion-MNIST: ``data_dir`` alone when given, else Debian's
    package folder, then ``cache_dir``."""
    if data_dir is not None:
        return [data_dir]
    return [DEBIAN_FASHION_MNIST_DIR, cache_dir]


def load_fashion_mnist(data_dir, cache_dir, download=False):
    """Fashion-MNIST (train, test): uint8 arrays of shape (60000, 1, 28, 28) and (10000, 1, 28, 28).

    ``data_dir``: the one folder to search, or None for Debian's package folder then
    ``cache_dir``. ``download``: fetch the official gzipped files into ``data_dir`` (or
    ``cache_dir``) when no folder holds them.
    """
    folders = fashion_mnist_folders(data_dir, cache_dir)
    remedies = (f"Get them with `apt-get install {FASHION_MNIST_PACKAGE}` (Debian's package; "
                f"its folder {DEBIAN_FASHION_MNIST_DIR} is searched when no data_dir / "
                f"--data-dir is given) or with download=True (--download), which fetches them "
                f"into {folders[-1]}.")
    return load_idx_dataset(folders, "Fashion-MNIST", remedies,
                            download_fashion_mnist if download else None)
