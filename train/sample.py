"""Draw samples from a trained flow and save them as a PNG grid.

    python -m train.sample --ckpt runs/latest/checkpoint.h5 --n 64 --temperature 0.7
"""
import argparse
import sys
import time

import nfcore

from .session import BLAS_THREADS_HELP, limit_blas_threads, load_flow, save_samples


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m train.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint.h5 written by train.run")
    parser.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="scale of the latent Gaussian (default 0.7; 1.0 is the model itself)")
    parser.add_argument("--out", default="samples.png", help="PNG file to write (default samples.png)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--blas-threads", type=int, default=None, help=BLAS_THREADS_HELP)
    args = parser.parse_args(argv)
    if args.n < 1 or args.temperature < 0:
        parser.error("--n must be positive and --temperature non-negative")
    try:
        nfcore.set_backend(args.backend)
        limit_blas_threads(args.blas_threads)
        flow, meta, _ = load_flow(args.ckpt)
        started = time.time()
        save_samples(flow, args.out, args.n, args.temperature, meta["config"]["n_bits"], args.seed)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1)
    print(f"{args.n} samples at temperature {args.temperature} in {time.time() - started:.2f} s "
          f"-> {args.out}")


if __name__ == "__main__":
    main()
