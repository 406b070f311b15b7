"""One entry point for every data set: ``load_dataset(name, data_dir, download, image_size)``.

Every loader returns ``(train, test)``: uint8 arrays of shape (N, C, H, W), values 0..255.

=============  =====================  ===========================================================
name           shape of an image      data_dir holds
=============  =====================  ===========================================================
digits         (1, 8, 8)              nothing: bundled with scikit-learn (the default)
mnist          (1, 28, 28)            train-/t10k-images-idx3-ubyte[.gz]
fashion-mnist  (1, 28, 28)            train-/t10k-images-idx3-ubyte[.gz]
cifar10        (3, 32, 32)            cifar-10-batches-py/ or cifar-10-python.tar.gz
imagenet32     (3, 32, 32)            train_data_batch_1..10.npz, val_data.npz
imagenet64     (3, 64, 64)            train_data_batch_1..10.npz, val_data.npz
celeba         (3, s, s), s=64        img_align_celeba/, or is that folder
folder         (3, s, s), s=64        png / jpg / jpeg images, subfolders included
=============  =====================  ===========================================================

``data_dir`` defaults to ``~/.cache/nfcore/<name>``; for fashion-mnist, when no ``data_dir`` is
given, the folder of Debian's package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)
is searched before it. ``download=True`` fetches CIFAR-10, MNIST and Fashion-MNIST from their
official addresses when they are missing (into ``data_dir`` or the cache folder); the others
must be put in place by hand. ``image_size`` resizes celeba / folder images; the other sets have
a fixed size.
"""
import os

from .cifar10 import load_cifar10
from .digits import load_digits
from .folder import load_celeba, load_folder
from .imagenet import load_imagenet
from .mnist import load_fashion_mnist, load_mnist

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "imagenet32", "imagenet64", "celeba",
            "folder")
NATIVE_SIZES = {"digits": 8, "mnist": 28, "fashion-mnist": 28, "cifar10": 32, "imagenet32": 32,
                "imagenet64": 64}
DOWNLOADABLE = ("mnist", "fashion-mnist", "cifar10")
DEFAULT_IMAGE_SIZE = 64


def default_data_dir(name):
    """Where a data set is looked for when no folder is given: ~/.cache/nfcore/<name>."""
    return os.path.join(os.path.expanduser("~"), ".cache", "nfcore", name)


def load_dataset(name, data_dir=None, download=False, image_size=None):
    """(train, test) uint8 arrays in NCHW layout for the data set called ``name``."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if download and name not in DOWNLOADABLE:
        raise ValueError(f"--download is available for {', '.join(DOWNLOADABLE)} only; "
                         f"{name!r} must be put in place by hand")
    if name in NATIVE_SIZES and image_size not in (None, NATIVE_SIZES[name]):
        size = NATIVE_SIZES[name]
        raise ValueError(f"{name} images are {size}×{size}; image_size={image_size} applies "
                         f"only to celeba and folder")
    if name == "digits":
        return load_digits()
    if name == "fashion-mnist":   # data_dir None: Debian's package folder, then the cache
        return load_fashion_mnist(None if data_dir is None else os.fspath(data_dir),
                                  default_data_dir(name), download)
    data_dir = default_data_dir(name) if data_dir is None else os.fspath(data_dir)
    if name == "mnist":
        return load_mnist(data_dir, download)
    if name == "cifar10":
        return load_cifar10(data_dir, download)
    if name in ("imagenet32", "imagenet64"):
        return load_imagenet(data_dir, NATIVE_SIZES[name])
    size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    if name == "celeba":
        return load_celeba(data_dir, size)
    return load_folder(data_dir, size)
