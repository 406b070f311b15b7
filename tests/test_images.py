"""The pictures a run writes (train/images.py): the bits/dim plot is a valid PNG drawn from
metrics records, and an image file name Pillow cannot write is one line saying what to give."""
import numpy as np
import pytest
from PIL import Image

from train import interpolate, reconstruct, sample
from train.images import bpd_curves, check_image_path, save_bpd_plot, save_image_grid

# metrics.jsonl of a run resumed at step 20: the second session's clock starts again at 0
RECORDS = [
    {"step": 10, "train_bpd": 4.2, "time_s": 5.0},
    {"step": 20, "train_bpd": 4.0, "time_s": 9.0},
    {"step": 20, "test_bpd": 3.9, "recon_error": 1e-6},
    {"step": 25, "test_bpd": 3.85, "recon_error": 1e-6},
    {"step": 30, "train_bpd": 3.8, "time_s": 3.0},
    {"step": 40, "train_bpd": float("nan"), "time_s": 6.0},
    {"step": 40, "test_bpd": 3.7, "recon_error": 1e-6},
    {"step": 40, "sampling_failed": "..."},
]


def test_bpd_curves_add_up_the_sessions_of_a_resumed_run():
    train, test = bpd_curves(RECORDS)
    assert train == [(10, 5.0, 4.2), (20, 9.0, 4.0), (30, 12.0, 3.8)]     # NaN left out
    assert test == [(20, 9.0, 3.9), (25, 10.5, 3.85), (40, 15.0, 3.7)]   # 25: interpolated


@pytest.mark.parametrize("records", [RECORDS, []], ids=["run", "no records yet"])
def test_bpd_plot_is_a_valid_png(tmp_path, records):
    path = tmp_path / "bpd.png"
    save_bpd_plot(records, path)
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        picture.verify()
    with Image.open(path) as picture:
        width, height = picture.size
        assert width >= 800 and height >= 300         # two panels side by side
        pixels = np.asarray(picture.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10    # drawn, not blank


def test_a_name_pillow_cannot_write_says_what_to_give(tmp_path):
    assert check_image_path(tmp_path / "a.png") == tmp_path / "a.png"
    assert check_image_path("a.JPG") == "a.JPG"
    with pytest.raises(ValueError, match=r"--out rec has no file extension: give an image file "
                                         r"name ending in \.png, .*e\.g\. rec\.png"):
        check_image_path("rec")
    with pytest.raises(ValueError, match=r"extension \.txt, which is not an image format"):
        check_image_path("grid.txt")
    with pytest.raises(ValueError, match="is a folder"):
        check_image_path(tmp_path)
    images = np.zeros((4, 1, 8, 8), np.uint8)
    with pytest.raises(ValueError, match=r"ending in \.png"):
        save_image_grid(images, tmp_path / "grid")
    save_image_grid(images, tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").format == "PNG"


@pytest.mark.parametrize("command, extra", [
    (reconstruct, []), (sample, []), (interpolate, ["--indices", "0", "1"])])
def test_an_out_without_extension_is_one_line_naming_the_extensions(command, extra, capsys):
    with pytest.raises(SystemExit) as stop:
        command.parse_args(["--ckpt", "checkpoint.h5", *extra, "--out", "rec"])
    assert stop.value.code == 1
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and message.startswith("error: argument --out: rec has no "
                                                            "file extension")
    assert ".png, .jpg" in message and "e.g. rec.png" in message


def test_an_out_folder_gets_the_default_name_inside(tmp_path):
    args = reconstruct.parse_args(["--ckpt", "checkpoint.h5", "--out", str(tmp_path)])
    assert args.out == str(tmp_path / "reconstruct.png")
    args = sample.parse_args(["--ckpt", "checkpoint.h5", "--out", str(tmp_path / "s.jpg")])
    assert args.out == str(tmp_path / "s.jpg")
