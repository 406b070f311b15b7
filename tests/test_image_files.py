"""Image files as the folder data sets, train.interpolate --images and train.manipulate read
them (data/folder.py; issue 23): a pixel limit with a clear error, and pixels deeper than 8 bits
converted (16-bit, float) or refused with a message, never silently white or black."""
import numpy as np
import pytest
from PIL import Image

from data.folder import MAX_PIXELS, load_folder, read_image, read_image_as_is


def test_an_enormous_picture_in_a_small_file_is_one_clear_error(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 10000)).save(bomb)            # 200 megapixels, a few KB
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ValueError, match=f"bomb.png: the image is 200,000,000 pixels, more "
                                         f"than the {MAX_PIXELS:,} pixels"):
        read_image(str(bomb), 8)
    big = tmp_path / "big.png"
    Image.new("1", (9000, 8000)).save(big)               # under Pillow's limit, over ours
    with pytest.raises(ValueError, match="big.png: the image is 9000×8000 pixels, more than"):
        read_image_as_is(str(big), 1, 8, 8)
    for index in range(2):                               # and a folder data set holding it
        Image.new("RGB", (8, 8)).save(tmp_path / f"small{index}.png")
    big.unlink()
    with pytest.raises(ValueError, match="bomb.png: the image is 200,000,000 pixels"):
        load_folder(str(tmp_path), 8)


def test_sixteen_bit_images_are_scaled_to_eight_bits(tmp_path):
    values = np.array([[0, 257, 32896, 65535]] * 4, dtype=np.uint16)   # 0, 1, 128, 255
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    pixels = read_image_as_is(str(path), 1, 4, 4)
    np.testing.assert_array_equal(pixels[0], np.array([[0, 1, 128, 255]] * 4, dtype=np.uint8))
    rgb = read_image(str(path), 4)                       # grey to RGB, same levels
    np.testing.assert_array_equal(rgb[:, 0], np.array([[0, 1, 128, 255]] * 3, dtype=np.uint8))


def test_float_images_are_read_as_intensities_or_refused(tmp_path):
    values = np.array([[0.0, 0.5, 1.0, 0.25]] * 4, dtype=np.float32)
    path = tmp_path / "float.tif"
    Image.fromarray(values).save(path)
    pixels = read_image_as_is(str(path), 1, 4, 4)
    np.testing.assert_array_equal(pixels[0], np.array([[0, 128, 255, 64]] * 4, dtype=np.uint8))
    outside = tmp_path / "outside.tif"
    Image.fromarray(values * 300).save(outside)
    with pytest.raises(ValueError, match="outside.tif: a floating-point image with values "
                                         "from 0 to 300.*intensities in \\[0, 1\\]"):
        read_image_as_is(str(outside), 1, 4, 4)
