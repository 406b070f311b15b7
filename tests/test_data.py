"""Data loaders read small files written here in each official format; dequantization,
bits/dim and batching are checked against hand-computed values."""
import gzip
import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from data import (Batches, bits_per_dim, iterate_test_batches, load_dataset, postprocess,
                  preprocess)
from data import download, mnist


def random_images(rng, n, c, h, w):
    return rng.integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


# ---------------------------------------------------------------------------------- digits

def test_digits_shapes_range_and_determinism():
    train, test = load_dataset("digits")
    assert train.shape == (1500, 1, 8, 8) and test.shape == (297, 1, 8, 8)
    assert train.dtype == np.uint8 and test.dtype == np.uint8
    assert train.max() == 255 and train.min() == 0
    # values are round(v * 255 / 16) for v in 0..16
    allowed = {round(v * 255 / 16) for v in range(17)}
    assert set(np.unique(np.concatenate([train, test]))) <= allowed
    again_train, again_test = load_dataset("digits")
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(test, again_test)


# --------------------------------------------------------------------------------- CIFAR-10

def cifar_batch_bytes(images):
    batch = {b"batch_label": b"a batch", b"labels": [0] * len(images),
             b"data": images.reshape(len(images), -1), b"filenames": [b"x.png"] * len(images)}
    return pickle.dumps(batch, protocol=2)


def write_cifar(tmp_path, rng, n=4):
    """The six batches (n images each) as a cifar-10-batches-py folder and as a .tar.gz."""
    images = {name: random_images(rng, n, 3, 32, 32)
              for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, batch in images.items():
        (folder / name).write_bytes(cifar_batch_bytes(batch))
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    train = np.concatenate([images[f"data_batch_{i}"] for i in range(1, 6)])
    return folder, archive, train, images["test_batch"]


def test_cifar10_from_folder_parent_and_archive(tmp_path):
    folder, archive, train, test = write_cifar(tmp_path, np.random.default_rng(0))
    archive_only = tmp_path / "only_archive"
    archive_only.mkdir()
    os.replace(archive, archive_only / archive.name)
    for where in (folder, tmp_path, archive_only, archive_only / archive.name):
        got_train, got_test = load_dataset("cifar10", data_dir=where)
        assert got_train.shape == (20, 3, 32, 32) and got_test.shape == (4, 3, 32, 32)
        assert got_train.dtype == np.uint8
        np.testing.assert_array_equal(got_train, train)
        np.testing.assert_array_equal(got_test, test)


def test_cifar10_channel_major_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    row = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.full(1024, 30)])
    image = row.astype(np.uint8).reshape(1, 3, 32, 32)
    image[0, 0, 0, 1] = 99                       # red channel, row 0, column 1 = byte 1
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(cifar_batch_bytes(image))
    train, _ = load_dataset("cifar10", data_dir=folder)
    assert train[0, 0, 0, 0] == 10 and train[0, 1, 5, 5] == 20 and train[0, 2, 31, 31] == 30
    assert train[0, 0, 0, 1] == 99


def test_cifar10_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", data_dir=tmp_path)
    folder, archive, _, _ = write_cifar(tmp_path, np.random.default_rng(0))
    os.remove(folder / "test_batch")
    with pytest.raises(FileNotFoundError, match="test_batch"):
        load_dataset("cifar10", data_dir=folder)
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="test_batch"):
        load_dataset("cifar10", data_dir=folder)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 5), np.uint8)}))
    with pytest.raises(ValueError, match="test_batch.*3072"):
        load_dataset("cifar10", data_dir=folder)
    archive.write_bytes(archive.read_bytes()[:100])
    with pytest.raises(ValueError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", data_dir=archive)


def test_cifar10_pickle_refuses_foreign_objects(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": os.getcwd}))
    with pytest.raises(ValueError, match="data_batch_1.*unexpected object"):
        load_dataset("cifar10", data_dir=folder)


# ------------------------------------------------------------------------------------ MNIST

def idx_bytes(images, magic=2051):
    n, rows, cols = images.shape
    header = np.array([magic, n, rows, cols], dtype=">i4").tobytes()
    return header + images.tobytes()


@pytest.mark.parametrize("gzipped", [False, True])
def test_mnist_idx_files(tmp_path, gzipped):
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    for name, images in (("train-images-idx3-ubyte", train), ("t10k-images-idx3-ubyte", test)):
        content = idx_bytes(images)
        if gzipped:
            (tmp_path / (name + ".gz")).write_bytes(gzip.compress(content))
        else:
            (tmp_path / name).write_bytes(content)
    got_train, got_test = load_dataset("mnist", data_dir=tmp_path)
    assert got_train.shape == (5, 1, 28, 28) and got_test.shape == (3, 1, 28, 28)
    assert got_train.dtype == np.uint8
    np.testing.assert_array_equal(got_train[:, 0], train)
    np.testing.assert_array_equal(got_test[:, 0], test)


def test_mnist_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", data_dir=tmp_path)
    images = np.zeros((2, 28, 28), np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(images, magic=2049))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*2049.*2051"):
        load_dataset("mnist", data_dir=tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(images)[:-10])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*expected 1584"):
        load_dataset("mnist", data_dir=tmp_path)
    os.remove(tmp_path / "train-images-idx3-ubyte")
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", data_dir=tmp_path)


# ---------------------------------------------------------------------------- Fashion-MNIST

def write_idx_pair(folder, train, test, gzipped=False):
    """The two idx3 image files of ``train`` and ``test`` ((N, rows, cols) uint8) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, images in (("train-images-idx3-ubyte", train), ("t10k-images-idx3-ubyte", test)):
        content = idx_bytes(images)
        if gzipped:
            (folder / (name + ".gz")).write_bytes(gzip.compress(content))
        else:
            (folder / name).write_bytes(content)


@pytest.fixture
def fashion_folders(tmp_path, monkeypatch):
    """(Debian's folder, the cache folder), both empty, in place of the real ones."""
    debian = tmp_path / "debian" / "fashion-mnist"
    monkeypatch.setattr(mnist, "DEBIAN_FASHION_MNIST_DIR", str(debian))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return debian, tmp_path / "home" / ".cache" / "nfcore" / "fashion-mnist"


@pytest.mark.parametrize("gzipped", [False, True])
def test_fashion_mnist_idx_files(tmp_path, gzipped):
    rng = np.random.default_rng(11)
    train = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, size=(2, 28, 28), dtype=np.uint8)
    write_idx_pair(tmp_path, train, test, gzipped)
    got_train, got_test = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert got_train.shape == (4, 1, 28, 28) and got_test.shape == (2, 1, 28, 28)
    assert got_train.dtype == np.uint8 and got_test.dtype == np.uint8
    np.testing.assert_array_equal(got_train[:, 0], train)
    np.testing.assert_array_equal(got_test[:, 0], test)
    with pytest.raises(ValueError, match="fashion-mnist images are 28"):
        load_dataset("fashion-mnist", data_dir=tmp_path, image_size=64)


def test_fashion_mnist_missing_files_name_the_folders_and_both_remedies(tmp_path, fashion_folders):
    debian, cache = fashion_folders
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("fashion-mnist")
    message = str(error.value)
    for text in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte", str(debian), str(cache),
                 "apt-get install dataset-fashion-mnist", "--download"):
        assert text in message
    assert message.index(str(debian)) < message.index(str(cache))
    given = tmp_path / "given"
    with pytest.raises(FileNotFoundError, match=f"searched {given}\\. .*apt-get install "
                                                f"dataset-fashion-mnist.*--download"):
        load_dataset("fashion-mnist", data_dir=given)


def test_fashion_mnist_corrupt_files(tmp_path):
    images = np.zeros((2, 28, 28), np.uint8)
    write_idx_pair(tmp_path, images, images, gzipped=True)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images, 2049)))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz.*2049.*2051"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)[:10]))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz.*too short.*10 bytes"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(idx_bytes(images))   # not gzipped
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: cannot be read"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_fashion_mnist_folder_order(tmp_path, fashion_folders):
    """An explicit folder wins; else Debian's folder (when it holds both files), then the cache."""
    debian, cache = fashion_folders
    given = tmp_path / "given"
    for folder, count in ((given, 1), (debian, 2), (cache, 3)):
        images = np.full((count, 28, 28), count, np.uint8)
        write_idx_pair(folder, images, images, gzipped=folder == debian)
    assert len(load_dataset("fashion-mnist", data_dir=given)[0]) == 1
    assert len(load_dataset("fashion-mnist")[0]) == 2
    os.remove(debian / "t10k-images-idx3-ubyte.gz")           # an incomplete folder is passed over
    assert len(load_dataset("fashion-mnist")[0]) == 3
    os.remove(given / "t10k-images-idx3-ubyte")               # an explicit folder is the only one
    with pytest.raises(FileNotFoundError, match=f"searched {given}\\."):
        load_dataset("fashion-mnist", data_dir=given)


def test_fashion_mnist_download_into_the_cache(tmp_path, fashion_folders, monkeypatch):
    debian, cache = fashion_folders
    train = np.full((3, 28, 28), 7, np.uint8)
    test = np.full((2, 28, 28), 9, np.uint8)
    served = {"train-images-idx3-ubyte.gz": gzip.compress(idx_bytes(train)),
              "t10k-images-idx3-ubyte.gz": gzip.compress(idx_bytes(test))}
    requested = []

    def fake_urlopen(url, timeout=None):
        requested.append(url)
        return io.BytesIO(served[url.rsplit("/", 1)[1]])
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(RuntimeError, match="checksum mismatch.*8d4fb7e6c68d591d4c3dfef9ec88bf0d"):
        load_dataset("fashion-mnist", download=True)          # the official MD5s are checked
    assert os.listdir(cache) == []
    served_md5 = {name: hashlib.md5(content).hexdigest() for name, content in served.items()}
    monkeypatch.setattr(download, "FASHION_MNIST_MD5", served_md5)
    requested.clear()
    got_train, got_test = load_dataset("fashion-mnist", download=True)
    assert requested == ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/" + name
                         for name in served]
    assert sorted(os.listdir(cache)) == sorted(served) and not debian.exists()
    np.testing.assert_array_equal(got_train[:, 0], train)
    np.testing.assert_array_equal(got_test[:, 0], test)
    given = tmp_path / "given"                                # --data-dir: downloaded there
    load_dataset("fashion-mnist", data_dir=given, download=True)
    assert sorted(os.listdir(given)) == sorted(served)


@pytest.mark.skipif(not os.path.isdir(mnist.DEBIAN_FASHION_MNIST_DIR),
                    reason=f"Debian's dataset-fashion-mnist is not installed "
                           f"({mnist.DEBIAN_FASHION_MNIST_DIR} is missing)")
def test_fashion_mnist_debian_package_files():
    train, test = load_dataset("fashion-mnist", data_dir=mnist.DEBIAN_FASHION_MNIST_DIR)
    assert train.shape == (60000, 1, 28, 28) and test.shape == (10000, 1, 28, 28)
    assert train.dtype == np.uint8 and test.dtype == np.uint8


# ------------------------------------------------------------------------------ ImageNet32

def write_imagenet(folder, rng, size, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    train = []
    for i in range(1, 11):
        images = random_images(rng, n, 3, size, size)
        np.savez(folder / f"train_data_batch_{i}.npz", data=images.reshape(n, -1),
                 labels=np.arange(n), mean=np.zeros(3 * size * size))
        train.append(images)
    test = random_images(rng, n + 1, 3, size, size)
    np.savez_compressed(folder / "val_data.npz", data=test.reshape(n + 1, -1))
    return np.concatenate(train), test


def test_imagenet32_npz_batches(tmp_path):
    train, test = write_imagenet(tmp_path / "Imagenet32_train_npz", np.random.default_rng(2), 32)
    os.replace(tmp_path / "Imagenet32_train_npz" / "val_data.npz", tmp_path / "val_data.npz")
    got_train, got_test = load_dataset("imagenet32", data_dir=tmp_path)
    assert got_train.shape == (30, 3, 32, 32) and got_test.shape == (4, 3, 32, 32)
    assert got_train.dtype == np.uint8
    np.testing.assert_array_equal(got_train, train)
    np.testing.assert_array_equal(got_test, test)


def test_imagenet_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_data_batch_1.npz"):
        load_dataset("imagenet32", data_dir=tmp_path)
    write_imagenet(tmp_path, np.random.default_rng(3), 32)
    with pytest.raises(ValueError, match="train_data_batch_1.npz.*12288"):  # 32×32 files
        load_dataset("imagenet64", data_dir=tmp_path)
    np.savez(tmp_path / "val_data.npz", images=np.zeros((2, 3072), np.uint8))
    with pytest.raises(ValueError, match="val_data.npz.*'data'"):
        load_dataset("imagenet32", data_dir=tmp_path)
    (tmp_path / "val_data.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="val_data.npz"):
        load_dataset("imagenet32", data_dir=tmp_path)


# ---------------------------------------------------------------------- folder and CelebA

def test_folder_of_png_and_jpeg(tmp_path):
    rng = np.random.default_rng(4)
    (tmp_path / "sub").mkdir()
    names = [f"img_{i:02d}.png" for i in range(9)] + ["sub/z_last.png"]
    for name in names:
        pixels = rng.integers(0, 256, size=(6, 10, 3), dtype=np.uint8)   # 10 wide, 6 high
        Image.fromarray(pixels).save(tmp_path / name)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "img_04b.jpg")  # grayscale
    (tmp_path / "notes.txt").write_text("not an image")
    train, test = load_dataset("folder", data_dir=tmp_path, image_size=6)
    assert train.shape == (10, 3, 6, 6) and test.shape == (1, 3, 6, 6)
    assert train.dtype == np.uint8
    # sorted by relative path: img_00 … img_04, img_04b, img_05 … img_08 | sub/z_last
    expected_last = np.asarray(Image.open(tmp_path / "sub/z_last.png"))[:, 2:8]
    np.testing.assert_array_equal(test[0], expected_last.transpose(2, 0, 1))
    expected_first = np.asarray(Image.open(tmp_path / "img_00.png"))[:, 2:8]
    np.testing.assert_array_equal(train[0], expected_first.transpose(2, 0, 1))
    np.testing.assert_array_equal(train[5], 0)    # the grayscale JPEG, as RGB


def test_celeba_is_the_folder_loader_on_img_align_celeba(tmp_path):
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    for i in range(20):
        Image.fromarray(np.full((218, 178, 3), i, np.uint8)).save(folder / f"{i:06d}.jpg")
    train, test = load_dataset("celeba", data_dir=tmp_path)
    assert train.shape == (18, 3, 64, 64) and test.shape == (2, 3, 64, 64)
    assert abs(int(test[-1].mean()) - 19) <= 1 and abs(int(train[0].mean())) <= 1
    train_direct, _ = load_dataset("celeba", data_dir=folder, image_size=32)
    assert train_direct.shape == (18, 3, 32, 32)


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset("folder", data_dir=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="found 0 image"):
        load_dataset("folder", data_dir=tmp_path)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png"):
        load_dataset("folder", data_dir=tmp_path, image_size=4)


def test_load_dataset_argument_errors():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match="cifar10 images are 32"):
        load_dataset("cifar10", image_size=64)
    with pytest.raises(ValueError, match="--download"):
        load_dataset("imagenet32", download=True)


# --------------------------------------------------------------------------------- download

def test_download_without_network_fails_cleanly(tmp_path, monkeypatch):
    def no_network(url, timeout=None):
        raise urllib.error.URLError("no route to host")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(RuntimeError, match="download failed.*put it at .*cifar-10-python.tar.gz"):
        load_dataset("cifar10", data_dir=tmp_path, download=True)
    with pytest.raises(RuntimeError, match="download failed.*train-images-idx3-ubyte.gz"):
        load_dataset("mnist", data_dir=tmp_path, download=True)
    assert os.listdir(tmp_path) == []             # no partial file left behind


def test_download_checks_the_checksum(tmp_path, monkeypatch):
    content = b"pretend archive"
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(content))
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        download.download_cifar10(tmp_path)
    assert os.listdir(tmp_path) == []
    import hashlib
    path = download.download_file(["https://example.invalid/f"], str(tmp_path / "f.bin"),
                                  hashlib.md5(content).hexdigest())
    assert open(path, "rb").read() == content and os.listdir(tmp_path) == ["f.bin"]


# ------------------------------------------------------------------ dequantize and bits/dim

@pytest.mark.parametrize("n_bits", [8, 5, 1])
def test_preprocess_postprocess_round_trip(n_bits):
    rng = np.random.default_rng(5)
    images = random_images(rng, 4, 3, 8, 8)
    x = preprocess(images, n_bits, rng)
    assert x.dtype == np.float32 and x.shape == images.shape
    assert x.min() >= -0.5 and x.max() < 0.5
    quantized = (images >> (8 - n_bits)) << (8 - n_bits)
    np.testing.assert_array_equal(postprocess(x, n_bits), quantized)
    # the noise is within one bin: x · 2^n_bits lies in [level, level + 1)
    offset = (x.astype(np.float64) + 0.5) * 2 ** n_bits - (images >> (8 - n_bits))
    assert offset.min() >= 0 and offset.max() <= 1


def test_preprocess_formula_and_checks():
    images = np.array([[[[0, 7, 8, 255]]]], dtype=np.uint8)
    x = preprocess(images, 5, np.random.default_rng(6))
    u = np.random.default_rng(6).random(images.shape)
    expected = (np.floor(images / 8.0) + u) / 32 - 0.5
    np.testing.assert_allclose(x, expected, rtol=0, atol=1e-7)
    assert postprocess(np.array([-3.0, 3.0]), 8).tolist() == [0, 255]   # clipped
    with pytest.raises(TypeError, match="uint8"):
        preprocess(images.astype(np.float32), 8, np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_bits"):
        preprocess(images, 9, np.random.default_rng(0))


def test_bits_per_dim_by_hand():
    # D = 3·2·2 = 12, 8 bits: bpd = (5 + 7 − 2 + 12·8·ln 2) / (12·ln 2) = 10/(12 ln 2) + 8
    log_prob_z = np.array([-5.0, -12.0 * np.log(2.0)])
    logdet = np.array([-7.0 + 2.0, 0.0])
    bpd = bits_per_dim(log_prob_z, logdet, n_dims=12, n_bits=8)
    np.testing.assert_allclose(bpd, [10.0 / (12 * np.log(2.0)) + 8.0, 9.0])
    np.testing.assert_allclose(bits_per_dim(np.array([0.0]), np.array([0.0]), 12, 5), [5.0])


# ---------------------------------------------------------------------------------- batches

def test_training_batches_are_a_function_of_seed_and_step():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1) * 16
    batches = Batches(images, 3, n_bits=4, seed=7)
    assert batches.steps_per_epoch == 3                   # the short last batch is left out
    epoch0 = [batches(step) for step in range(3)]
    levels = np.concatenate([np.floor((x + 0.5) * 16).ravel() for x in epoch0])
    np.testing.assert_array_equal(levels, np.random.default_rng([7, 0, 0]).permutation(10)[:9])
    again = Batches(images, 3, n_bits=4, seed=7)          # a fresh object, steps out of order
    np.testing.assert_array_equal(again(4), batches(4))
    np.testing.assert_array_equal(again(1), epoch0[1])
    assert not np.array_equal(Batches(images, 3, 4, seed=8)(1), epoch0[1])
    with pytest.raises(ValueError, match="fewer than --batch-size 11"):
        Batches(images, 11, 4, 0)
    with pytest.raises(ValueError, match="batch_size"):
        Batches(images, 0, 4, 0)


def test_test_batches_cover_the_set_in_order():
    x = np.arange(10)
    batches = list(iterate_test_batches(x, 4))
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError, match="batch_size"):
        iterate_test_batches(x, 0)
