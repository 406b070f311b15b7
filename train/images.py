"""Pictures a run writes: grids of images (Pillow), and the bits/dim curves (matplotlib, imported
only when a curve is drawn, so that ``import nfcore`` and the other command lines stay light)."""
import argparse
import math
import os
import sys

import numpy as np
from PIL import Image

from .files import write_atomically

# Named in the error messages; Pillow writes more (writable_extensions()).
COMMON_EXTENSIONS = (".png", ".jpg", ".bmp", ".gif", ".tif", ".webp")


def writable_extensions():
    """The file extensions Pillow can write an image under, lower case with the dot."""
    Image.init()
    return sorted(extension for extension, kind in Image.registered_extensions().items()
                  if kind in Image.SAVE)


def check_image_path(path, option="--out"):
    """``path`` when Pillow can write an image under that name; otherwise ValueError saying what
    to give instead (the message a user sees after ``error:``)."""
    extension = os.path.splitext(os.fspath(path))[1].lower()
    if extension in writable_extensions():
        return path
    if os.path.isdir(path):
        problem = "is a folder"
        example = os.path.join(path, "images.png")
    else:
        problem = "has no file extension" if not extension else \
            f"has the extension {extension}, which is not an image format Pillow writes"
        example = os.path.splitext(os.fspath(path))[0] + ".png"
    prefix = f"{option} {path}" if option else f"{path}"
    raise ValueError(f"{prefix} {problem}: give an image file name ending in "
                     f"{', '.join(COMMON_EXTENSIONS[:-1])} or {COMMON_EXTENSIONS[-1]} "
                     f"(PNG is lossless), e.g. {example}")


def image_file_option(default_name):
    """An argparse type for an --out image file: a name Pillow can write, or an existing folder,
    which then gets ``default_name`` inside it. A wrong name is one line saying what to give."""
    def parse(text):
        if os.path.isdir(text):
            return os.path.join(text, default_name)
        try:
            return check_image_path(text, option=None)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    parse.__name__ = "image file name"
    return parse


def image_grid(images, columns=None, padding=1):
    """One uint8 picture (H', W', 3 or 1) tiling uint8 images (N, C, H, W), C = 1 or 3."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"image_grid needs uint8 images (N, 1 or 3, H, W), got "
                         f"{images.dtype} {images.shape}")
    N, C, H, W = images.shape
    columns = columns or math.ceil(math.sqrt(N))
    rows = math.ceil(N / columns)
    grid = np.zeros((rows * (H + padding) + padding, columns * (W + padding) + padding, C), np.uint8)
    for index, image in enumerate(images):
        top = padding + (index // columns) * (H + padding)
        left = padding + (index % columns) * (W + padding)
        grid[top:top + H, left:left + W] = image.transpose(1, 2, 0)
    return grid


def save_image_grid(images, path, columns=None, scale=1):
    """Save uint8 images (N, C, H, W) as one image grid (PNG, or what ``path``'s extension names),
    each pixel drawn ``scale`` times larger."""
    check_image_path(path, option=None)
    grid = image_grid(images, columns)
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    save_picture(picture, path)


def save_picture(picture, path):
    """Write a Pillow image to ``path`` in the format its extension names, atomically
    (train/files.py): a full disk or an interrupt leaves the previous file, never part of one."""
    kind = Image.registered_extensions()[os.path.splitext(os.fspath(path))[1].lower()]
    if kind == "JPEG" and picture.mode not in ("L", "RGB"):
        picture = picture.convert("RGB")
    write_atomically(path, lambda file: picture.save(file, format=kind))


def bpd_curves(records):
    """(train, test) from a run's metrics records (metrics.jsonl, one dict per line): lists of
    (step, seconds, bits/dim), finite values only. seconds: the wall-clock time since the run
    started (``time_s`` of the train records, logged every 10 steps); a resumed run's sessions,
    whose clocks each start at 0, are added up. Test records carry no time: theirs is
    interpolated between the train records around their step."""
    clock, offset, previous = [], 0.0, 0.0
    for record in records:
        if "time_s" in record:
            if record["time_s"] < previous:          # a resumed session: its clock restarted
                offset += previous
            previous = record["time_s"]
            clock.append((record["step"], offset + previous))

    def seconds(step):
        if not clock:
            return 0.0
        steps, times = zip(*clock)
        return float(np.interp(step, steps, times))

    train, test = [], []
    for record in records:
        for key, series in (("train_bpd", train), ("test_bpd", test)):
            value = record.get(key)
            if value is not None and math.isfinite(value):
                series.append((record["step"], seconds(record["step"]), value))
    return train, test


def save_bpd_plot(records, path, title=None):
    """Save the bits/dim curves of a run's metrics records as a PNG: train and test bits/dim
    against the step (left) and against the wall-clock seconds since the run started (right:
    evaluations, checkpoints and Numba's compilation included, as in ``time_s``)."""
    import matplotlib
    if "matplotlib.pyplot" not in sys.modules:    # a user's own pyplot keeps its backend
        matplotlib.use("Agg")                    # no display needed
    from matplotlib.figure import Figure         # no pyplot: no global figure state

    train, test = bpd_curves(records)
    figure = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    by_step, by_time = figure.subplots(1, 2, sharey=True)
    for axes, column, label in ((by_step, 0, "step"), (by_time, 1, "seconds since the run started (wall clock)")):
        for name, series, style in (("train", train, dict(color="tab:blue", linewidth=1.5)),
                                    ("test", test, dict(color="tab:red", linewidth=1.5, marker="o",
                                                        markersize=4))):
            if series:
                axes.plot([point[column] for point in series], [point[2] for point in series],
                          label=name, **style)
        axes.set_xlabel(label)
        axes.grid(True, alpha=0.4)
        if train or test:
            axes.legend()
    by_step.set_ylabel("bits/dim")
    if not (train or test):
        by_step.text(0.5, 0.5, "no bits/dim logged yet", ha="center", transform=by_step.transAxes)
    if title is None and test:
        title = f"test bits/dim {test[-1][2]:.4f} at step {test[-1][0]}"
    if title:
        figure.suptitle(title)
    kind = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    write_atomically(path, lambda file: figure.savefig(file, format=kind))   # as save_picture
