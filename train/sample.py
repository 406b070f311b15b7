"""Draw samples from a trained flow and save them as a PNG grid.

    python -m train.sample --ckpt runs/latest/checkpoint.h5 --n 64 --temperature 0.7

By default it samples with the weights train.run sampled and evaluated with (the EMA of a run
trained with --ema); --weights raw takes the trained weights themselves.

Sampling checks its own inverse (Flow.sample, nfcore/conditioning.py): the samples' estimated
rounding error is printed, and past --tolerance no image is written and the command fails.
"""
import time

from nfcore.conditioning import SAMPLE_TOLERANCE

from .cli import ArgumentParser, at_least, positive_float, positive_int, run_command
from .images import image_file_option
from .session import add_checkpoint_options, open_checkpoint, save_samples


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m train.sample", description=__doc__.split("\n\n")[0],
                            epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--ckpt", required=True, help="checkpoint.h5 written by train.run")
    parser.add_argument("--n", type=positive_int, default=64, help="number of samples, >= 1 (default 64)")
    parser.add_argument("--temperature", type=at_least(0.0, float), default=0.7,
                        help="scale of the latent Gaussian, >= 0 (default 0.7; 1.0 is the model itself)")
    parser.add_argument("--out", default="samples.png", type=image_file_option("samples.png"),
                        help="image file to write (.png, .jpg, ...; a folder: samples.png in it; "
                             "default samples.png)")
    parser.add_argument("--seed", type=at_least(0), default=0, help="seed of the draw, >= 0 (default 0)")
    parser.add_argument("--tolerance", type=positive_float, default=SAMPLE_TOLERANCE,
                        help="largest accepted estimated rounding error of the samples, in the "
                             "data's [-0.5, 0.5] units, > 0 (default %(default)g); past it the "
                             "model's inverse is ill-conditioned and nothing is written")
    add_checkpoint_options(parser)
    return parser.parse_args(argv)


def sample(args):
    flow, meta = open_checkpoint(args)
    started = time.time()
    save_samples(flow, args.out, args.n, args.temperature, meta["config"]["n_bits"], args.seed,
                 tolerance=args.tolerance)
    print(f"{args.n} samples at temperature {args.temperature} ({meta['weights']} weights) in "
          f"{time.time() - started:.2f} s -> {args.out}")
    print(f"inverse check: estimated rounding error of the samples {flow.last_sample_error:.1e} "
          f"(tolerance {args.tolerance:g})")


def main(argv=None):
    return run_command(sample, parse_args(argv))


if __name__ == "__main__":
    main()
