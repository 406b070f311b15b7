"""CIFAR-10 from the official "python version": pickled batches of 10000 images each.

Each of ``data_batch_1`` … ``data_batch_5`` (train) and ``test_batch`` is a pickled dict whose
``b"data"`` entry is a (10000, 3072) uint8 array: one row per image, the 1024 red values first,
then green, then blue, each in row-major order, so a row reshapes to (3, 32, 32) directly.

The batches are read from any of
  - the ``cifar-10-batches-py`` folder itself, or the folder that holds it;
  - the official archive ``cifar-10-python.tar.gz`` (read in place with ``tarfile``, nothing is
    extracted), given as the path or found inside ``data_dir``.

Pickles can run code when loaded, so the unpickler below accepts only what a CIFAR batch holds:
NumPy arrays, dtypes and scalars.
"""
import os
import pickle
import tarfile

import numpy as np

FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCHES = ["test_batch"]
IMAGE_SHAPE = (3, 32, 32)

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global except the NumPy pieces of an array."""

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch")
        return super().find_class(module, name)


def read_batch(file, where):
    """The (N, 3, 32, 32) uint8 images of one pickled batch read from an open binary ``file``.

    ``where`` names the batch in error messages (a path, or "archive:member").
    """
    try:
        batch = _ArrayUnpickler(file, encoding="bytes").load()
    except Exception as error:
        raise ValueError(f"{where}: not a readable CIFAR-10 pickle batch ({error})") from error
    if not isinstance(batch, dict) or b"data" not in batch:
        raise ValueError(f"{where}: expected a pickled dict with a b'data' entry")
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != np.prod(IMAGE_SHAPE):
        raise ValueError(f"{where}: b'data' should be uint8 of shape (N, 3072), "
                         f"got {data.dtype} {data.shape}")
    return data.reshape(-1, *IMAGE_SHAPE)


def _read_folder(folder):
    def read(names):
        batches = []
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"CIFAR-10 batch missing: {path}")
            with open(path, "rb") as file:
                batches.append(read_batch(file, path))
        return np.concatenate(batches)
    return read(TRAIN_BATCHES), read(TEST_BATCHES)


def _read_archive(archive_path):
    try:
        archive = tarfile.open(archive_path, "r:gz")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ValueError(f"{archive_path}: not a readable .tar.gz archive ({error})") from error
    with archive:
        def read(names):
            batches = []
            for name in names:
                member = f"{FOLDER}/{name}"
                where = f"{archive_path}:{member}"
                try:
                    file = archive.extractfile(member)
                except KeyError:
                    raise FileNotFoundError(f"CIFAR-10 batch missing: {where}") from None
                except (tarfile.TarError, OSError, EOFError) as error:
                    raise ValueError(f"{where}: cannot be read ({error})") from error
                batches.append(read_batch(file, where))
            return np.concatenate(batches)
        return read(TRAIN_BATCHES), read(TEST_BATCHES)


def find_cifar10(data_dir):
    """Where the batches are: ("folder", path) or ("archive", path); None if nowhere."""
    if os.path.isfile(data_dir):
        return "archive", data_dir
    for folder in (data_dir, os.path.join(data_dir, FOLDER)):
        if os.path.isfile(os.path.join(folder, TRAIN_BATCHES[0])):
            return "folder", folder
    if os.path.isfile(os.path.join(data_dir, ARCHIVE)):
        return "archive", os.path.join(data_dir, ARCHIVE)
    return None


def load_cifar10(data_dir, download=False):
    """(train, test): uint8 arrays of shape (50000, 3, 32, 32) and (10000, 3, 32, 32).

    ``data_dir``: the batches folder, its parent, or the .tar.gz archive (see module doc).
    ``download``: fetch the official archive into ``data_dir`` when nothing is found there.
    """
    found = find_cifar10(data_dir)
    if found is None and download:
        from .download import download_cifar10
        found = "archive", download_cifar10(data_dir)
    if found is None:
        raise FileNotFoundError(
            f"CIFAR-10 not found in {data_dir}: expected the folder {FOLDER}/ (with "
            f"data_batch_1..5 and test_batch) or the archive {ARCHIVE}; pass download=True "
            f"(--download) to fetch it")
    kind, path = found
    return _read_folder(path) if kind == "folder" else _read_archive(path)
