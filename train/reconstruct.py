"""Encode and decode images of a checkpoint's test set: the reconstruction error, their
bits/dim, and a PNG of each original above its reconstruction.

    python -m train.reconstruct --ckpt runs/latest/checkpoint.h5 --n 64

Prints one JSON line: the largest and the mean absolute difference between the dequantized
inputs x (in [-0.5, 0.5)) and decode(encode(x)), and the mean bits/dim of those images (with
the dequantization noise of train.evaluate: over the whole test set it is evaluate's figure).
"""
import json

import numpy as np

from nfcore import latent
from nfcore.backend import to_numpy

from .cli import ArgumentParser, positive_int, run_command
from .images import image_file_option
from .model_images import dataset_images, dequantize, save_pictures
from .session import DATA_DIR_HELP, add_checkpoint_options, open_checkpoint

MAX_COLUMNS = 16


def originals_above_reconstructions(x, rebuilt, columns):
    """(2·rows·columns, C, H, W): rows of ``columns`` originals, each followed by the row of
    their reconstructions; the last pair of rows padded with black (−0.5) images."""
    n = x.shape[0]
    rows = -(-n // columns)
    padding = np.full((rows * columns - n,) + x.shape[1:], -0.5, dtype=x.dtype)
    x, rebuilt = np.concatenate([x, padding]), np.concatenate([rebuilt, padding])
    pairs = [block for row in range(rows)
             for block in (x[row * columns:(row + 1) * columns],
                           rebuilt[row * columns:(row + 1) * columns])]
    return np.concatenate(pairs)


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m train.reconstruct", description=__doc__.split("\n\n")[0],
                            epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--ckpt", required=True, help="checkpoint.h5 written by train.run")
    parser.add_argument("--n", type=positive_int, default=64,
                        help="how many images, the first of the set, >= 1, at most the set's "
                             "size (default 64)")
    parser.add_argument("--split", default="test", choices=("test", "train"),
                        help="which part of the data set (default test)")
    parser.add_argument("--data-dir", help=DATA_DIR_HELP)
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="images encoded at once, >= 1 (default: the training batch size)")
    parser.add_argument("--out", default="reconstruct.png", type=image_file_option("reconstruct.png"),
                        help="image file to write (.png, .jpg, ...; a folder: reconstruct.png in "
                             "it): rows of originals, each above its row of reconstructions, at "
                             f"most {MAX_COLUMNS} a row (default reconstruct.png)")
    add_checkpoint_options(parser)
    return parser.parse_args(argv)


def reconstruct(args):
    flow, meta = open_checkpoint(args)
    config = meta["config"]
    images = dataset_images(config, args.data_dir, args.split)
    if args.n > len(images):
        raise ValueError(f"--n {args.n}: the {args.split} set of {config['dataset']} has "
                         f"{len(images)} images; give --n {len(images)} or fewer")
    images = images[:args.n]
    x = dequantize(images, config)
    batch_size = args.batch_size or config["batch_size"]
    rebuilt, bits_per_dim = [], []
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size]
        rebuilt.append(to_numpy(latent.reconstruct(flow, batch)))
        bits_per_dim.append(to_numpy(flow.bits_per_dim(batch, config["n_bits"])))
    x, rebuilt = to_numpy(x), np.concatenate(rebuilt)
    error = np.abs(rebuilt.astype(np.float64) - x.astype(np.float64))
    columns = min(len(x), MAX_COLUMNS)
    save_pictures(originals_above_reconstructions(x, rebuilt, columns), args.out, columns, config)
    result = {"checkpoint": args.ckpt, "dataset": config["dataset"], "split": args.split,
              "weights": meta["weights"], "images": len(x), "max_abs_error": float(error.max()),
              "mean_abs_error": float(error.mean()),
              "bits_per_dim": float(np.concatenate(bits_per_dim).astype(np.float64).mean()),
              "out": args.out}
    print(json.dumps(result))
    return result


def main(argv=None):
    return run_command(reconstruct, parse_args(argv))


if __name__ == "__main__":
    main()
