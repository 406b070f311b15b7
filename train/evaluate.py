"""Test bits/dim of a trained flow over a whole test set (as the papers report it).

    python -m train.evaluate --ckpt runs/latest/checkpoint.h5
"""
import argparse
import json
import sys

from tqdm import tqdm

import nfcore
from data import load_dataset

from .session import BLAS_THREADS_HELP, limit_blas_threads, load_flow, evaluate_bits_per_dim


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint.h5 written by train.run")
    parser.add_argument("--data-dir", help="folder of the data set (default: as in training)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: as in training")
    parser.add_argument("--split", default="test", choices=("test", "train"))
    parser.add_argument("--backend", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--blas-threads", type=int, default=None, help=BLAS_THREADS_HELP)
    args = parser.parse_args(argv)
    try:
        nfcore.set_backend(args.backend)
        limit_blas_threads(args.blas_threads)
        flow, meta, _ = load_flow(args.ckpt)
        config = meta["config"]
        train_images, test_images = load_dataset(config["dataset"], args.data_dir,
                                                 image_size=config.get("image_size"))
        images = test_images if args.split == "test" else train_images
        with tqdm(total=len(images), desc=f"{args.split} bpd", unit="img", disable=None) as progress:
            bpd = evaluate_bits_per_dim(flow, images, config["n_bits"], args.batch_size or config["batch_size"],
                                    config["seed"], progress)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1)
    result = {"checkpoint": args.ckpt, "dataset": config["dataset"], "split": args.split,
              "images": len(images), "bits_per_dim": bpd, "step": meta["step"]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
