"""Edit images along an attribute direction in latent space (Glow's smiling, glasses, age...),
as a PNG grid: a row per image, a column per alpha.

    python -m train.manipulate --ckpt CKPT --data-dir DIR --attributes list_attr_celeba.txt \\
        --attribute Smiling --alphas -1,-0.5,0,0.5,1 --n 8

The direction is the mean latent (every Split's z and z_top, nfcore.latent) of the images with
the attribute minus the mean latent of those without, over the first --direction-images images
the attribute file lists. It is cached next to the checkpoint, in
<checkpoint>.direction-<attribute>-n<N>-<ema|raw>.npz, under a key made of the checkpoint's
bytes, the weights, the attribute, and the images and labels used: a changed checkpoint,
attribute file or image count computes it again; so does a damaged cache file, with a note.
When the checkpoint's folder is read-only the cache goes to ~/.cache/nfcore/directions/
(a note says where); when it cannot be written at all, a note says so and the edit goes on.
The edited images are the last --n images
the file lists (the end of CelebA's test partition and of the folder loader's test split), or
--images files. Each is encoded to z and decoded from z + alpha·direction; alpha 0 gives the
image back.

The attribute file is in CelebA's published format (list_attr_celeba.txt: a count line, a line
of attribute names, then 'file ±1 ...' lines); every image of the data folder must be listed in
it. The model must be a celeba or folder model: images are center-cropped and resized to its
size as in training. Prints one JSON line.
"""
import argparse
import hashlib
import json
import os
import sys
import zipfile

import numpy as np
from tqdm import tqdm

from data.attributes import read_attributes
from data.folder import celeba_folder, list_images, read_image
from nfcore import latent
from nfcore.backend import to_device, to_numpy

from .cli import ArgumentParser, at_least, describe, positive_int, run_command
from .files import write_atomically
from .model_images import (RESIZED_DATASETS, dequantize, evaluation_noise, read_model_images,
                           save_pictures)
from .session import add_checkpoint_options, open_checkpoint


def parse_alphas(text):
    """[float, ...] from '-1,-0.5,0,0.5,1'."""
    try:
        alphas = [float(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}")
    if not all(np.isfinite(alphas)):
        raise argparse.ArgumentTypeError(f"alphas must be finite, got {text!r}")
    return alphas


def check_model(path, config):
    """ValueError unless the checkpoint is a model of photos (celeba or folder)."""
    if config["dataset"] not in RESIZED_DATASETS:
        shape = "×".join(str(size) for size in config["image_shape"])
        raise ValueError(f"{path} is a {config['dataset']} model ({shape} images); attribute "
                         f"editing needs a model trained with --dataset celeba or folder")


def check_folder_matches(folder, attributes, attributes_path, used_files):
    """ValueError when an image of ``folder`` is missing from the attribute file, or a file the
    edit uses is missing from the folder."""
    on_disk = [os.path.relpath(path, folder) for path in list_images(folder)]
    listed = set(attributes.files)
    unlisted = [name for name in on_disk if name not in listed]
    if unlisted:
        raise ValueError(f"{len(unlisted)} image(s) of {folder} are missing from "
                         f"{attributes_path}, first {unlisted[0]}")
    present = set(on_disk)
    absent = [name for name in used_files if name not in present]
    if absent:
        raise ValueError(f"{len(absent)} image(s) listed in {attributes_path} are not in "
                         f"{folder}, first {absent[0]}")


def cache_path(checkpoint, attribute, n_images, weights):
    """(path, note): where the direction is cached, next to the checkpoint; when the
    checkpoint's folder cannot be written (read-only), in FALLBACK_CACHE, under a name that
    also holds a digest of the checkpoint's full path, with a note saying so."""
    stem = os.path.splitext(checkpoint)[0]
    name = f"{os.path.basename(stem)}.direction-{attribute}-n{n_images}-{weights}.npz"
    folder = os.path.dirname(os.path.abspath(checkpoint))
    if os.access(folder, os.W_OK):
        return os.path.join(os.path.dirname(checkpoint), name), None
    where = hashlib.sha256(os.path.abspath(checkpoint).encode()).hexdigest()[:12]
    path = os.path.join(os.path.expanduser(FALLBACK_CACHE), f"{where}-{name}")
    return path, f"note: {folder} is read-only: the direction is cached in {path}"


FALLBACK_CACHE = os.path.join("~", ".cache", "nfcore", "directions")


def cache_key(checkpoint, weights, attribute, files, has):
    """SHA-256 of the checkpoint's bytes, the weights used (ema / raw), the attribute, and the
    images and labels used."""
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(json.dumps([weights, attribute, files, [bool(value) for value in has]]).encode())
    return digest.hexdigest()


def load_cached_direction(path, key, n_dims):
    """(direction, note): the latent.Direction in the cache when it holds ``key``, else None,
    with a note when the file is there but damaged (truncated, not a cache): it is computed
    again and the cache rewritten."""
    if not os.path.exists(path):
        return None, None
    try:
        with np.load(path) as cached:
            if str(cached["key"]) != key or cached["vector"].shape != (n_dims,):
                return None, None
            return latent.Direction(cached["vector"], int(cached["n_with"]),
                                    int(cached["n_without"])), None
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as error:
        return None, (f"note: the cached direction {path} is damaged ({error}); computing it "
                      f"again")


def save_cached_direction(path, key, direction):
    """Write the cache atomically (train/files.py: a temporary file renamed over it, removed
    when the write fails)."""
    write_atomically(path, lambda file: np.savez(
        file, key=key, vector=to_numpy(direction.vector), n_with=direction.n_with,
        n_without=direction.n_without))


def direction_batches(folder, files, has, config, batch_size):
    """(x, has) batches of the direction's images, read and dequantized as the model takes them."""
    rng = evaluation_noise(config)
    size = config["image_shape"][-1]
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        images = np.stack([read_image(os.path.join(folder, name), size) for name in chunk])
        yield dequantize(images, config, rng), has[start:start + batch_size]


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    # "--alphas -1,..." starts with "-", which argparse would take for an option: glue it on
    for index in range(len(argv) - 1):
        if argv[index] == "--alphas":
            argv[index:index + 2] = [f"--alphas={argv[index + 1]}"]
            break
    parser = ArgumentParser(prog="python -m train.manipulate", description=__doc__.split("\n\n")[0],
                            epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--ckpt", required=True, help="checkpoint.h5 of a celeba or folder model")
    parser.add_argument("--data-dir", required=True,
                        help="the image folder (CelebA: img_align_celeba or the folder holding it)")
    parser.add_argument("--attributes", required=True,
                        help="attribute file in CelebA's format (list_attr_celeba.txt)")
    parser.add_argument("--attribute", required=True, help="attribute name, e.g. Smiling")
    parser.add_argument("--alphas", type=parse_alphas, default=[-1.0, -0.5, 0.0, 0.5, 1.0],
                        help="multiples of the direction added, comma-separated "
                             "(default -1,-0.5,0,0.5,1)")
    parser.add_argument("--n", type=positive_int, default=8,
                        help="how many images to edit, >= 1: the last ones the file lists "
                             "(default 8)")
    parser.add_argument("--images", nargs="+", metavar="FILE",
                        help="edit these image files instead of the last --n listed")
    parser.add_argument("--direction-images", type=at_least(2), default=2000,
                        help="the direction is computed over the first N >= 2 images the "
                             "attribute file lists (default 2000; CelebA lists 202599)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="images encoded at once, >= 1 (default: the training batch size)")
    parser.add_argument("--out", default="manipulate.png",
                        help="PNG grid to write (default manipulate.png)")
    add_checkpoint_options(parser)
    return parser.parse_args(argv)


def manipulate(args):
    flow, meta = open_checkpoint(args)
    config = meta["config"]
    check_model(args.ckpt, config)
    attributes = read_attributes(args.attributes)
    has = attributes.column(args.attribute)
    folder = celeba_folder(args.data_dir)
    n_direction = min(args.direction_images, len(attributes.files))
    direction_files = attributes.files[:n_direction]
    shown_files = [] if args.images else attributes.files[-args.n:]
    check_folder_matches(folder, attributes, args.attributes, direction_files + shown_files)

    cache, note = cache_path(args.ckpt, args.attribute, n_direction, meta["weights"])
    key = cache_key(args.ckpt, meta["weights"], args.attribute, direction_files, has[:n_direction])
    direction, damaged = load_cached_direction(cache, key, flow.n_dims)
    source = "cached"
    if direction is None:
        for line in (note, damaged):
            if line:
                print(line, file=sys.stderr)
        source = "computed"
        batches = direction_batches(folder, direction_files, has[:n_direction], config,
                                    args.batch_size or config["batch_size"])
        with tqdm(total=n_direction, desc=f"direction {args.attribute}", unit="img",
                  disable=None) as progress:
            direction = latent.attribute_direction(flow, batches, progress)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
            save_cached_direction(cache, key, direction)
        except OSError as error:       # the edit goes on; only the next run recomputes
            print(f"note: the direction is not cached ({describe(error)}); it will be computed "
                  f"again next time", file=sys.stderr)
            cache = None

    if args.images:
        images = read_model_images(args.images, config)
    else:
        size = config["image_shape"][-1]
        images = np.stack([read_image(os.path.join(folder, name), size) for name in shown_files])
    x = dequantize(images, config)
    edited = to_numpy(latent.manipulate(flow, x, to_device(direction.vector), args.alphas))
    save_pictures(edited.reshape((-1,) + edited.shape[2:]), args.out, len(args.alphas), config)
    result = {"checkpoint": args.ckpt, "weights": meta["weights"], "attribute": args.attribute,
              "direction": source, "cache": cache, "with": direction.n_with,
              "without": direction.n_without, "images": len(x), "alphas": args.alphas,
              "out": args.out}
    if 0.0 in args.alphas:
        unchanged = edited[:, args.alphas.index(0.0)].astype(np.float64)
        result["alpha0_max_error"] = float(np.abs(unchanged - to_numpy(x)).max())
    print(json.dumps(result))
    return result


def main(argv=None):
    return run_command(manipulate, parse_args(argv))


if __name__ == "__main__":
    main()
