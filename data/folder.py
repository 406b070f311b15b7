"""Any folder of images (png / jpg / jpeg), and CelebA as one such folder.

Every image file under the folder (subfolders included) is opened with Pillow, converted to
RGB, center-cropped to a square of side min(width, height), and resized to
``image_size``×``image_size`` (bicubic, which Pillow antialiases when shrinking).

The split is deterministic: files sorted by their path relative to the folder, the last 10%
(at least one image) form the test set, the rest the train set.

CelebA is this loader pointed at ``img_align_celeba`` (the 202599 aligned 178×218 faces);
its own partition file (list_eval_partition.txt) is not used.
"""
import os

import numpy as np
from PIL import Image

EXTENSIONS = (".png", ".jpg", ".jpeg")
TEST_FRACTION = 0.1
CELEBA_FOLDER = "img_align_celeba"


def list_images(folder):
    """Paths of the image files under ``folder``, sorted by their path relative to it."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder}")
    relative_paths = []
    for root, _, names in os.walk(folder):
        for name in names:
            if name.lower().endswith(EXTENSIONS):
                relative_paths.append(os.path.relpath(os.path.join(root, name), folder))
    return [os.path.join(folder, path) for path in sorted(relative_paths)]


def read_image(path, image_size):
    """One image as a (3, image_size, image_size) uint8 array: RGB, center-cropped, resized."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, SyntaxError) as error:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: not a readable image ({error})") from error
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((image_size, image_size), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def load_folder(folder, image_size=64):
    """(train, test): uint8 arrays of shape (N, 3, image_size, image_size)."""
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    paths = list_images(folder)
    if len(paths) < 2:
        raise FileNotFoundError(f"{folder}: found {len(paths)} image file(s) "
                                f"({', '.join(EXTENSIONS)}); need at least 2 to split")
    images = np.empty((len(paths), 3, image_size, image_size), dtype=np.uint8)
    for index, path in enumerate(paths):
        images[index] = read_image(path, image_size)
    n_test = max(1, int(len(paths) * TEST_FRACTION))
    return images[:-n_test], images[-n_test:]


def read_image_as_is(path, channels, height, width):
    """One image as a (channels, height, width) uint8 array, converted to grey (channels = 1)
    or RGB (channels = 3) but neither cropped nor resized: ValueError naming the file when it
    is not width×height pixels."""
    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
    except (OSError, SyntaxError) as error:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: not a readable image ({error})") from error
    if image.size != (width, height):
        raise ValueError(f"{path}: the image is {image.width}×{image.height} pixels, the model "
                         f"takes {width}×{height}")
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def celeba_folder(data_dir):
    """The folder of CelebA's images: ``img_align_celeba`` inside ``data_dir``, or ``data_dir``."""
    nested = os.path.join(data_dir, CELEBA_FOLDER)
    return nested if os.path.isdir(nested) else data_dir


def load_celeba(data_dir, image_size=64):
    """CelebA: the folder loader on ``img_align_celeba`` (``data_dir`` itself or inside it)."""
    return load_folder(celeba_folder(data_dir), image_size)
