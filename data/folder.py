"""Any folder of images (png / jpg / jpeg), and CelebA as one such folder.

Every image file under the folder (subfolders included) is opened with Pillow, converted to
RGB, center-cropped to a square of side min(width, height), and resized to
``image_size``×``image_size`` (bicubic, which Pillow antialiases when shrinking).

The split is deterministic: files sorted by their path relative to the folder, the last 10%
(at least one image) form the test set, the rest the train set.

CelebA is this loader pointed at ``img_align_celeba`` (the 202599 aligned 178×218 faces);
its own partition file (list_eval_partition.txt) is not used.

Every image file read here (the folder data sets, and the files train.interpolate and
train.manipulate take) is refused above ``MAX_PIXELS`` pixels, with one line naming the file,
before its pixels are decoded (a small compressed file can hold an enormous picture). Pixels
deeper than 8 bits are brought to 8 bits: 16-bit images (and 32-bit integer ones holding 16-bit
values, as Pillow opens some 16-bit PNGs) divided by 257, so 65535 is 255; float images (32-bit
TIFFs) read as intensities in [0, 1], times 255. A float image with values outside [0, 1], or
an integer one outside 16 bits, is refused with a message rather than guessed at.
"""
import os
import re
import warnings

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


MAX_PIXELS = 64_000_000      # an 8000×8000 photo; larger files are refused (module docstring)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def open_image(path, mode):
    """The image file at ``path`` converted to ``mode`` ("RGB" or "L") with 8-bit pixels
    (module docstring); ValueError naming the file when it is unreadable, larger than
    MAX_PIXELS, or holds values that have no 8-bit meaning."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # refused below
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise _too_large(path, f"{width}×{height} pixels")
                return _eight_bit(image, path).convert(mode)
    except Image.DecompressionBombError as error:      # past Pillow's own limit, while opening
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        raise _too_large(path, f"{int(pixels.group(1)):,} pixels" if pixels else
                         "larger than Pillow opens") from None
    except (OSError, SyntaxError) as error:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: not a readable image ({error})") from error


def _too_large(path, size):
    return ValueError(f"{path}: the image is {size}, more than the {MAX_PIXELS:,} pixels this "
                      f"code reads (data.folder.MAX_PIXELS); shrink it first")


def _eight_bit(image, path):
    """``image`` with 8-bit pixels: 16-bit ones / 257, float ones (intensities in [0, 1]) × 255;
    other modes as they are (Pillow's conversions handle them)."""
    if image.mode not in SIXTEEN_BIT_MODES + ("I", "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        if values.size and not (np.isfinite(values).all() and 0 <= values.min()
                                and values.max() <= 1):
            raise ValueError(f"{path}: a floating-point image with values from {values.min():g} "
                             f"to {values.max():g}; float images are read as intensities in "
                             f"[0, 1]: save it with 8-bit (or 16-bit) pixels instead")
        scaled = values * 255
    else:
        if values.size and not (0 <= values.min() and values.max() <= 65535):
            raise ValueError(f"{path}: a 32-bit integer image with values from {values.min():g} "
                             f"to {values.max():g}, beyond 16 bits: save it with 8-bit or 16-bit "
                             f"pixels")
        scaled = values / 257
    return Image.fromarray(np.round(scaled).astype(np.uint8))


def read_image(path, image_size):
    """One image as a (3, image_size, image_size) uint8 array: RGB, center-cropped, resized."""
    image = open_image(path, "RGB")
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
    image = open_image(path, "L" if channels == 1 else "RGB")
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
