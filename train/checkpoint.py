"""Checkpoints: named arrays plus a JSON description, in one HDF5 file, written atomically.

File layout (HDF5, via h5py)::

    /                       attributes: format = "nfcore-checkpoint", format_version = 1,
                                        meta = JSON text (config, dataset, step, epoch,
                                        RNG state, ActNorm flags, ...)
    /layers/3/weight        one dataset per array; "/" in a name makes HDF5 groups
    /optim/m/3/weight       ...

Writing goes to a temporary file in the destination folder, which is flushed to disk and then
renamed over the destination with ``os.replace`` (atomic on POSIX and Windows): a crash at any
moment leaves either the previous checkpoint or the new one, never half a file.

A NumPy RNG is saved through ``rng.bit_generator.state`` (a dict of ints, JSON-safe) and
restored with ``rng.bit_generator.state = meta[...]``: the restored generator continues the
exact same random stream.
"""
import json
import os
import tempfile

import h5py
import numpy as np

from nfcore.backend import to_numpy

FORMAT = "nfcore-checkpoint"
FORMAT_VERSION = 1
ARRAY_KINDS = "biufc"  # bool, int, unsigned, float, complex


def _json_default(value):
    """Let json.dumps write NumPy scalars and arrays (as numbers and lists)."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"meta holds a {type(value).__name__}, which JSON cannot store")


def _check_names(arrays):
    """Raise unless every name is a usable HDF5 path and none is also another's group."""
    groups = set()
    for name in arrays:
        if not isinstance(name, str) or not name or any(part == "" for part in name.split("/")):
            raise ValueError(f"array name {name!r}: expected a non-empty string like "
                             f"'layers/3/weight' (no leading, trailing or double '/')")
        parts = name.split("/")
        groups.update("/".join(parts[:i]) for i in range(1, len(parts)))
    clashes = sorted(groups & set(arrays))
    if clashes:
        raise ValueError(f"array name {clashes[0]!r} is also the group of other arrays")


def save_checkpoint(path, arrays, meta):
    """Write ``arrays`` (name → NumPy/CuPy array) and ``meta`` (a JSON-able dict) to ``path``."""
    path = os.fspath(path)
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    _check_names(arrays)
    host_arrays = {name: np.asarray(to_numpy(array)) for name, array in arrays.items()}
    for name, array in host_arrays.items():
        if array.dtype.kind not in ARRAY_KINDS:
            raise TypeError(f"array {name!r} has dtype {array.dtype}: only numeric and bool "
                            f"arrays can be stored")
    meta_json = json.dumps(meta, default=_json_default)

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                         dir=folder)
    os.close(handle)
    try:
        with h5py.File(temporary, "w") as file:
            file.attrs["format"] = FORMAT
            file.attrs["format_version"] = FORMAT_VERSION
            file.attrs["meta"] = meta_json
            for name, array in host_arrays.items():
                file.create_dataset(name, data=array)
        with open(temporary, "rb+") as written:      # force the bytes onto the disk
            os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def load_checkpoint(path):
    """(arrays, meta) from a file written by ``save_checkpoint``; arrays are NumPy."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    arrays = {}

    def read(name, item):
        if isinstance(item, h5py.Dataset):
            arrays[name] = np.asarray(item[()])

    try:
        with h5py.File(path, "r") as file:
            marker = file.attrs.get("format")
            version = file.attrs.get("format_version")
            meta_json = file.attrs.get("meta")
            if marker == FORMAT:
                file.visititems(read)
    except (OSError, KeyError, RuntimeError, ValueError) as error:  # h5py on damaged files
        raise ValueError(f"{path}: not a readable checkpoint, truncated or corrupt "
                         f"({error})") from error
    if marker != FORMAT:
        raise ValueError(f"{path} is an HDF5 file but not an nfcore checkpoint "
                         f"(format attribute {marker!r}, expected {FORMAT!r})")
    if version is None or not 1 <= int(version) <= FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format version {version}; this code reads "
                         f"versions 1 to {FORMAT_VERSION}")
    try:
        meta = json.loads(meta_json)
    except (TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: the 'meta' attribute is not valid JSON ({error})") from error
    return arrays, meta
