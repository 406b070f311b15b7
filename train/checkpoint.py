"""Checkpoints: named arrays plus a JSON description, in one HDF5 file, written atomically.

File layout (HDF5, via h5py)::

    /                       attributes: format = "nfcore-checkpoint", format_version = 2,
                                        meta = JSON text (train.run: the run's config, step,
                                        optimizer_step)
    /model/3/weight         one dataset per array; "/" in a name makes HDF5 groups
    /state/2/initialized    (train.run's names: model/, state/, optim/m/, optim/v/, optim/ema/)
    /optim/m/3/weight       ...

Writing never lets HDF5 touch the disk: the whole file is built in memory (h5py on an
``io.BytesIO``), so a failing write cannot crash the HDF5 library half-way. Its bytes are written
as every other output is (train/files.py, ``write_atomically``): to a
temporary file in the destination folder with ordinary file I/O, are flushed to disk (fsync),
renamed over the destination with ``os.replace`` (atomic on POSIX and Windows), and the folder
is fsynced so that the rename itself is durable. A crash at any moment leaves either the
previous checkpoint or the new one, never half a file. When the file system says no (full,
read-only, no permission) ``save_checkpoint`` removes its temporary file and raises
``CheckpointWriteError`` (an OSError) with one line naming the file and the reason; the previous
checkpoint is untouched. A temporary file left by a killed process is removed by
``remove_stale_temporaries`` (train.run removes every temporary file of its folder on start-up,
``files.remove_temporaries``).

No random generator state is saved: train.run draws the batch of step s, its order and its
dequantization noise, from (seed, s) (data.Batches), so the config's seed and the step are all
a resumed run needs (what a training checkpoint holds: train/session.py).
"""
import io
import json
import os

import h5py
import numpy as np

from nfcore.backend import to_numpy

from .files import OutputWriteError, remove_temporaries, write_atomically

FORMAT = "nfcore-checkpoint"
FORMAT_VERSION = 2
# The format version from which each step kind's layers have their present definition: version 2
# made `cinc` and `emerging` the published layers (upper-triangular self-tap, bias; Emerging's
# two convolutions in the published order). Older files hold weights of a different function.
LAYER_DEFINITION_VERSION = {"cinc": 2, "emerging": 2}
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

    image = hdf5_image(host_arrays, meta_json)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_atomically(path, lambda file: file.write(image))
    except OSError as error:
        refusal = (error.__cause__ or error) if isinstance(error, OutputWriteError) else error
        raise CheckpointWriteError(path, refusal) from refusal


class CheckpointWriteError(OutputWriteError):
    """The file system refused a checkpoint; the previous one (if any) is kept."""
    CANNOT = "cannot save the checkpoint {path}"
    KEPT = "the previous checkpoint is kept"
    NOTHING = "no earlier checkpoint exists"


def hdf5_image(arrays, meta_json):
    """The bytes of the checkpoint file holding ``arrays`` (name → NumPy array) and the meta
    JSON text, built in memory."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as file:
        file.attrs["format"] = FORMAT
        file.attrs["format_version"] = FORMAT_VERSION
        file.attrs["meta"] = meta_json
        for name, array in arrays.items():
            file.create_dataset(name, data=array)
    return buffer.getvalue()


def remove_stale_temporaries(path):
    """Remove temporary files that a killed ``save_checkpoint(path, ...)`` left behind.
    Returns the removed paths. Call it only while no other process saves to ``path``."""
    return remove_temporaries(os.path.dirname(os.path.abspath(path)), os.path.basename(path))


def load_checkpoint(path, expected=None):
    """(arrays, meta) from a file written by ``save_checkpoint``; arrays are NumPy.

    Nothing is read before it is checked, so that a damaged or hostile file cannot make the
    reader allocate without bound: ``expected`` is a function of the meta (called once the meta
    is read) returning {name: shape} of the arrays to read; each is checked against the file's
    own description of it (shape, numeric dtype, stored in the file itself) before it is read,
    and every other dataset is ignored unread. A name the file lacks is left out (the caller
    names what it misses). Without ``expected`` every dataset is read, after checking that
    together they declare no more bytes than the file holds (checkpoints are stored
    uncompressed). Raises ValueError naming the path and the dataset otherwise."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path} is a folder: give the checkpoint file in it, e.g. "
                         f"{os.path.join(path, 'checkpoint.h5')}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with h5py.File(path, "r") as file:
            marker = file.attrs.get("format")
            version = file.attrs.get("format_version")
            meta_json = file.attrs.get("meta")
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
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: the 'meta' attribute holds a {type(meta).__name__}, not a "
                         f"JSON object")
    check_layer_definition(path, int(version), meta)
    return read_arrays(path, None if expected is None else expected(meta)), meta


def check_layer_definition(path, version, meta):
    """Refuse a checkpoint whose step kind's layer has changed definition since it was written
    (``LAYER_DEFINITION_VERSION``): its weights would be loaded into a different function."""
    config = meta.get("config")
    invconv = config.get("invconv") if isinstance(config, dict) else None
    since = LAYER_DEFINITION_VERSION.get(invconv) if isinstance(invconv, str) else None
    if since is not None and version < since:
        change = ("upper-triangular self-tap, bias" if invconv == "cinc" else
                  "its two convolutions in the published order and orientations, bias")
        raise ValueError(
            f"{path}: a --invconv {invconv} checkpoint of format version {version}, written "
            f"before version {since} changed the {invconv} layer to the published definition "
            f"({change}); its weights belong to a different function: train the model again")


MAX_DATASETS = 100_000      # more than any model this code builds has arrays


def read_arrays(path, expected=None):
    """name -> NumPy array from the checkpoint ``path``, each dataset checked before it is read
    (see ``load_checkpoint``): ``expected`` {name: shape} reads those alone, None all of them
    within the file's size."""
    try:
        with h5py.File(path, "r") as file:
            if expected is None:
                datasets = _all_datasets(path, file)
            else:
                datasets = {name: dataset for name in expected
                            if (dataset := _hard_dataset(path, file, name)) is not None}
            for name, dataset in datasets.items():
                _check_dataset(path, name, dataset, None if expected is None else expected[name])
            if expected is None:
                _check_total_size(path, datasets)
            return {name: np.asarray(dataset[()]) for name, dataset in datasets.items()}
    except (OSError, KeyError, RuntimeError) as error:       # h5py on damaged files
        raise ValueError(f"{path}: not a readable checkpoint, truncated or corrupt "
                         f"({error})") from error


def _hard_dataset(path, file, name):
    """The dataset ``name`` of ``file``, None when absent; ValueError when a part of its path
    is a link (soft or to another file: a checkpoint holds none) or not what it should be."""
    parts = name.split("/")
    for depth in range(1, len(parts) + 1):
        prefix = "/".join(parts[:depth])
        link = file.get(prefix, getlink=True)
        if link is None:
            return None
        if not isinstance(link, h5py.HardLink):
            raise ValueError(f"{path}: {prefix} is a {type(link).__name__}, not an array or "
                             f"group stored in the file")
    item = file[name]
    if not isinstance(item, h5py.Dataset):
        raise ValueError(f"{path}: {name} is a group, expected an array")
    return item


def _all_datasets(path, file):
    """{name: dataset} of every dataset in ``file`` (links are not followed)."""
    datasets = {}

    def visit(name, item):
        if isinstance(item, h5py.Dataset):
            datasets[name] = item
        if len(datasets) > MAX_DATASETS:
            raise ValueError(f"{path}: holds more than {MAX_DATASETS} arrays; not a checkpoint "
                             f"this code wrote")

    file.visititems(visit)
    return datasets


def _check_dataset(path, name, dataset, shape):
    """ValueError unless ``dataset`` is a numeric array stored in the file itself, of ``shape``
    when given; only its description is read."""
    if dataset.dtype.kind not in ARRAY_KINDS or dataset.dtype.itemsize > 16:
        raise ValueError(f"{path}: array {name} has dtype {dataset.dtype}, not a number type")
    if dataset.is_virtual or dataset.external:
        raise ValueError(f"{path}: array {name} refers to data outside the file")
    if shape is not None and tuple(dataset.shape) != tuple(shape):
        raise ValueError(f"{path}: array {name} has shape {tuple(dataset.shape)}, the model built "
                         f"from its config expects {tuple(shape)}")


def _check_total_size(path, datasets):
    """ValueError when the datasets declare more bytes than the file holds (a chunked dataset
    declared huge and left mostly unwritten would otherwise be allocated whole)."""
    declared = sum(int(np.prod(dataset.shape, dtype=np.float64)) * dataset.dtype.itemsize
                   for dataset in datasets.values())
    available = os.path.getsize(path)
    if declared > available:
        raise ValueError(f"{path}: its arrays declare {declared:,} bytes but the file holds "
                         f"{available:,}: damaged, or not a checkpoint this code wrote")
