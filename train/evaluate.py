"""Test bits/dim of a trained flow over a whole test set (as the papers report it).

    python -m train.evaluate --ckpt runs/latest/checkpoint.h5

By default it uses the weights train.run evaluated with (the EMA of a run trained with --ema),
so that its bits/dim equals final.json's on the same checkpoint; --weights raw takes the
trained weights themselves.
"""
import json

from tqdm import tqdm

from data import load_dataset

from .cli import ArgumentParser, positive_int, run_command
from .session import DATA_DIR_HELP, add_checkpoint_options, evaluate_bits_per_dim, open_checkpoint


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0],
                            epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--ckpt", required=True, help="checkpoint.h5 written by train.run")
    parser.add_argument("--data-dir", help=DATA_DIR_HELP)
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="images per forward pass, >= 1 (default: as in training); the "
                             "result does not depend on it beyond rounding")
    parser.add_argument("--split", default="test", choices=("test", "train"))
    add_checkpoint_options(parser)
    return parser.parse_args(argv)


def evaluate(args):
    flow, meta = open_checkpoint(args)
    config = meta["config"]
    train_images, test_images = load_dataset(config["dataset"], args.data_dir,
                                             image_size=config.get("image_size"))
    images = test_images if args.split == "test" else train_images
    with tqdm(total=len(images), desc=f"{args.split} bpd", unit="img", disable=None) as progress:
        bpd = evaluate_bits_per_dim(flow, images, config["n_bits"],
                                    args.batch_size or config["batch_size"], config["seed"], progress)
    result = {"checkpoint": args.ckpt, "dataset": config["dataset"], "split": args.split,
              "images": len(images), "bits_per_dim": bpd, "step": meta["step"],
              "weights": meta["weights"]}
    print(json.dumps(result))
    return result


def main(argv=None):
    return run_command(evaluate, parse_args(argv))


if __name__ == "__main__":
    main()
