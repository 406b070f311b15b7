"""The images train.reconstruct, train.interpolate and train.manipulate hand to a model: its
own data set, or image files read the way its training data was read; dequantized with the
fixed noise of train.evaluate; drawn as PNG grids."""
import numpy as np

from data import load_dataset, postprocess, preprocess
from data.folder import read_image, read_image_as_is
from nfcore.backend import to_device

from .images import save_image_grid

RESIZED_DATASETS = ("celeba", "folder")   # their loader crops and resizes every image


def dataset_images(config, data_dir, split):
    """uint8 images (N, C, H, W) of the checkpoint's data set (``split``: "test" or "train")."""
    train_images, test_images = load_dataset(config["dataset"], data_dir,
                                             image_size=config.get("image_size"))
    return test_images if split == "test" else train_images


def read_model_images(paths, config):
    """uint8 images (N, C, H, W) from image files, for the model of ``config``: center-cropped
    and resized as in training for celeba / folder models; for the others (fixed-size data
    sets) converted to grey or RGB and required to have the model's size (ValueError)."""
    C, H, W = config["image_shape"]
    if config["dataset"] in RESIZED_DATASETS:
        return np.stack([read_image(path, W) for path in paths])
    return np.stack([read_image_as_is(path, C, H, W) for path in paths])


def evaluation_noise(config):
    """The seeded generator of train.evaluate's dequantization noise."""
    return np.random.default_rng([config["seed"], 2])


def dequantize(images, config, rng=None):
    """The model's float32 inputs for uint8 images, on the current device: ``preprocess`` with
    noise from ``rng``, by default train.evaluate's (the first N images get the noise they get
    there)."""
    rng = evaluation_noise(config) if rng is None else rng
    return to_device(preprocess(images, config["n_bits"], rng))


def save_pictures(x, path, columns, config):
    """Save dequantized images x (N, C, H, W) as a PNG grid of ``columns`` columns (small
    images drawn larger, as train.sample draws them)."""
    pixels = postprocess(x, config["n_bits"])
    save_image_grid(pixels, path, columns=columns, scale=max(1, 64 // pixels.shape[-1]))
