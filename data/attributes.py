"""CelebA's attribute file, ``list_attr_celeba.txt``, in its published format::

    202599                                       the number of images
    5_o_Clock_Shadow Arched_Eyebrows ... Young   the 40 attribute names
    000001.jpg -1  1  1 -1 -1 ...                a file name and one value per name:
    000002.jpg -1 -1 -1  1 -1 ...                1 (has it) or -1 (has not)

Fields are separated by any run of spaces. A file in this format with other names (or another
number of them) reads the same way, so that any folder of images can be labelled like CelebA.
"""
import os
from dataclasses import dataclass

import numpy as np


@dataclass
class Attributes:
    """``names`` (A attribute names), ``files`` (N file names, in the file's order) and
    ``values`` (N, A) int8 of ±1, row i for files[i]."""
    names: list
    files: list
    values: np.ndarray

    def column(self, name):
        """(N,) bool: which files have the attribute ``name``; ValueError listing the known
        names when there is no such attribute."""
        if name not in self.names:
            raise ValueError(f"unknown attribute {name!r}: the attribute file has "
                             f"{', '.join(self.names)}")
        return self.values[:, self.names.index(name)] == 1


def read_attributes(path):
    """The ``Attributes`` of a file in CelebA's format. Raises FileNotFoundError, or
    ValueError naming the file and line where it departs from the format."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"attribute file not found: {path}")
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {error.start} is "
                         f"{error.object[error.start:error.start + 1]!r}); expected CelebA's "
                         f"attribute format, list_attr_celeba.txt") from None

    def malformed(number, what):
        return ValueError(f"{path} line {number}: {what} (expected CelebA's attribute format: "
                          f"a count line, a line of attribute names, then 'file ±1 ...' lines)")

    if len(lines) < 2:
        raise malformed(len(lines) + 1, "the file ends before its header")
    count_fields = lines[0].split()
    if len(count_fields) != 1 or not count_fields[0].isdigit():
        raise malformed(1, f"expected the number of images, got {lines[0][:60]!r}")
    count = int(count_fields[0])
    names = lines[1].split()
    if not names:
        raise malformed(2, "no attribute names")
    if len(names) > 1 and all(value in ("1", "-1") for value in names[1:]):
        raise malformed(2, f"expected the attribute names, got a file and its values "
                           f"({lines[1][:40]!r}...): the names line is missing")
    if len(set(names)) != len(names):
        raise malformed(2, "an attribute name appears twice")
    files, rows = [], []
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(names) + 1:
            raise malformed(number, f"{len(fields) - 1} values for {len(names)} attribute names")
        if any(value not in ("1", "-1") for value in fields[1:]):
            raise malformed(number, f"values must be 1 or -1, got {' '.join(fields[1:])[:60]!r}")
        files.append(fields[0])
        rows.append([int(value) for value in fields[1:]])
    if len(files) != count:
        raise malformed(1, f"says {count} images, the file lists {len(files)}")
    if len(set(files)) != len(files):
        seen = set()
        twice = next(name for name in files if name in seen or seen.add(name))
        raise ValueError(f"{path}: {twice} is listed twice")
    return Attributes(names, files, np.array(rows, dtype=np.int8).reshape(len(files), len(names)))
