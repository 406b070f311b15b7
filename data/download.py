"""Fetch CIFAR-10, MNIST and Fashion-MNIST from their official addresses, checked against
published MD5 sums.

Each file is streamed into a temporary file next to its destination, its checksum compared,
and only then renamed into place (``os.replace``): an interrupted or corrupted download never
leaves a file that a loader would mistake for the real one. Without network the functions
raise a RuntimeError that says which address failed and where to put the file by hand.

The MD5 sums are those published with the data (and checked by torchvision; Fashion-MNIST's
are in Zalando's README); MD5 is used here to detect a damaged transfer, not as a security
measure.
"""
import hashlib
import os
import tempfile
import urllib.request

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"

MNIST_MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "http://yann.lecun.com/exdb/mnist/"]
MNIST_MD5 = {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
             "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3"}

# Zalando's release (github.com/zalandoresearch/fashion-mnist, README "Get the Data").
FASHION_MNIST_MIRRORS = ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"]
FASHION_MNIST_MD5 = {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                     "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79"}

CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 60


def download_file(urls, path, md5):
    """Download the first address in ``urls`` that works to ``path``, checking its MD5.

    Returns ``path``. Raises RuntimeError naming the addresses tried and ``path`` if none works.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    failures = []
    for url in urls:
        handle, temporary = tempfile.mkstemp(prefix=os.path.basename(path) + ".",
                                             suffix=".part", dir=folder)
        try:
            digest = hashlib.md5()
            with os.fdopen(handle, "wb") as out, \
                    urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
                for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != md5:
                raise ValueError(f"checksum mismatch: MD5 {digest.hexdigest()}, expected {md5}")
            os.replace(temporary, path)
            return path
        except Exception as error:  # URLError, HTTPError, timeouts, checksum mismatch
            failures.append(f"{url}: {error}")
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
    raise RuntimeError(
        f"download failed for {os.path.basename(path)} ({'; '.join(failures)}). "
        f"Without network, fetch it by hand from {urls[0]} and put it at {path}")


def download_cifar10(data_dir):
    """The official CIFAR-10 archive, downloaded to ``data_dir``; returns its path."""
    return download_file([CIFAR10_URL], os.path.join(data_dir, CIFAR10_ARCHIVE), CIFAR10_MD5)


def download_missing(data_dir, mirrors, md5_by_name):
    """Each file named in ``md5_by_name`` that ``data_dir`` lacks, downloaded there from the
    first of ``mirrors`` (address prefixes) that works and checked against its MD5."""
    for name, md5 in md5_by_name.items():
        path = os.path.join(data_dir, name)
        if not os.path.isfile(path):
            download_file([mirror + name for mirror in mirrors], path, md5)


def download_mnist(data_dir):
    """The gzipped MNIST train and test image files, downloaded to ``data_dir`` if missing."""
    download_missing(data_dir, MNIST_MIRRORS, MNIST_MD5)


def download_fashion_mnist(data_dir):
    """Zalando's gzipped Fashion-MNIST train and test image files, downloaded to ``data_dir``
    if missing."""
    download_missing(data_dir, FASHION_MNIST_MIRRORS, FASHION_MNIST_MD5)
