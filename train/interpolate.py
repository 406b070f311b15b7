"""Interpolate between two images in latent space (every Split's z and z_top), as a PNG strip.

    python -m train.interpolate --ckpt runs/latest/checkpoint.h5 --indices 0 1 --steps 8
    python -m train.interpolate --ckpt CKPT --images a.png b.png --method spherical

The two images are encoded, their latents joined into one vector each (nfcore.latent), and
the path between the vectors decoded at --steps evenly spaced points, ends included: linearly,
or along the great circle (--method spherical). Image files are read as the model's training
data was: for celeba / folder models center-cropped and resized to the model's size; for the
fixed-size data sets (digits, mnist, cifar10, imagenet) they must already have the model's
size. Prints one JSON line, with the largest difference between each input and the decoded
end of the path (round-off: the ends are the inputs).
"""
import json

import numpy as np

from nfcore import latent
from nfcore.backend import to_numpy

from data.folder import MAX_PIXELS

from .cli import ArgumentParser, at_least, in_range, run_command
from .images import image_file_option
from .model_images import dataset_images, dequantize, read_model_images, save_pictures
from .session import DATA_DIR_HELP, add_checkpoint_options, open_checkpoint

MAX_STEPS = 1000      # images on the path: a strip of 1000 digits is 64,001 pixels wide


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m train.interpolate", description=__doc__.split("\n\n")[0],
                            epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--ckpt", required=True, help="checkpoint.h5 written by train.run")
    ends = parser.add_mutually_exclusive_group(required=True)
    ends.add_argument("--images", nargs=2, metavar=("A", "B"), help="two image files")
    ends.add_argument("--indices", nargs=2, type=at_least(0), metavar=("I", "J"),
                      help="two images of the checkpoint's data set, by index (see --split)")
    parser.add_argument("--split", default="test", choices=("test", "train"),
                        help="the part of the data set --indices point into (default test)")
    parser.add_argument("--data-dir", help=DATA_DIR_HELP)
    parser.add_argument("--steps", type=in_range(2, MAX_STEPS, int), default=8,
                        help=f"images on the path, both ends included, 2 to {MAX_STEPS} (and a "
                             f"strip of at most {MAX_PIXELS // 10 ** 6} megapixels, "
                             f"data.folder.MAX_PIXELS; default 8)")
    parser.add_argument("--method", default="linear", choices=latent.METHODS,
                        help="linear (default) or spherical interpolation of the latents")
    parser.add_argument("--out", default="interpolate.png", type=image_file_option("interpolate.png"),
                        help="image strip to write (.png, .jpg, ...; a folder: interpolate.png "
                             "in it; default interpolate.png)")
    add_checkpoint_options(parser)
    return parser.parse_args(argv)


def check_strip_size(steps, config):
    """ValueError unless the strip of ``steps`` images that ``save_pictures`` draws (one row,
    a pixel between images, small images drawn larger) holds at most MAX_PIXELS pixels."""
    _, H, W = config["image_shape"]
    scale = max(1, 64 // W)
    width, height = (steps * (W + 1) + 1) * scale, (H + 2) * scale
    if width * height > MAX_PIXELS:
        most = (MAX_PIXELS // (height * scale) - 1) // (W + 1)
        raise ValueError(f"--steps {steps}: the strip would be {width:,}x{height:,} pixels, more "
                         f"than {MAX_PIXELS:,} (data.folder.MAX_PIXELS); at most --steps {most} "
                         f"for this model's {H}x{W} images")


def interpolate(args):
    flow, meta = open_checkpoint(args)
    config = meta["config"]
    check_strip_size(args.steps, config)
    if args.images:
        images = read_model_images(args.images, config)
    else:
        data = dataset_images(config, args.data_dir, args.split)
        for index in args.indices:
            if index >= len(data):
                raise ValueError(f"--indices {index}: the {args.split} set has {len(data)} "
                                 f"images (0 to {len(data) - 1})")
        images = data[list(args.indices)]
    x = dequantize(images, config)
    z = latent.encode(flow, x)
    path = latent.decode(flow, latent.interpolate(z[0], z[1], args.steps, args.method))
    x, path = to_numpy(x), to_numpy(path)
    save_pictures(path, args.out, args.steps, config)
    end_errors = [float(np.abs(path[0].astype(np.float64) - x[0]).max()),
                  float(np.abs(path[-1].astype(np.float64) - x[1]).max())]
    result = {"checkpoint": args.ckpt, "weights": meta["weights"], "method": args.method,
              "steps": args.steps, "end_errors": end_errors, "out": args.out}
    print(json.dumps(result))
    return result


def main(argv=None):
    return run_command(interpolate, parse_args(argv))


if __name__ == "__main__":
    main()
