"""Train a normalizing flow with invertible k×k convolutions, from the command line.

    python -m train.run                                   # digits, embedded, minutes on a CPU
    python -m train.run --dataset cifar10 --data-dir DIR  # the papers' model: L=3, K=32, 512
    python -m train.run --invconv cinc --coupling quad    # CInC Flow with Quad coupling
    python -m train.run --resume                          # continue the run in --out

Every run writes to --out: config.json, metrics.jsonl (one JSON line per log), bpd.png (train
and test bits/dim), samples_step<N>_t<T>.png (temperatures 0.7 and 1.0), checkpoint.h5
(written atomically: a crash leaves the previous one), final.json (test bits/dim over the whole
test set). A step whose loss or gradients are NaN/Inf is skipped and logged; too many in a row
stop the run with the last good checkpoint kept.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
from tqdm import tqdm

import nfcore
from data import DATASETS, load_dataset, preprocess
from nfcore.backend import to_device
from nfcore.flow import COUPLINGS, STEP_KINDS
from nfcore.layers import NonFiniteError
from nfcore.optim import Adam

from .images import save_curve
from .session import (BLAS_THREADS_HELP, MODEL_KEYS, limit_blas_threads, build_flow, load_flow, optimizer_state, save_samples,
                      save_training_checkpoint, evaluate_bits_per_dim)

# Per-dataset defaults. cifar10 / imagenet: the published architecture (L=3 levels, K=32 steps,
# coupling width 512, Adam lr 1e-3 with warm-up, 8 bits). digits: small and fast, so that the
# main job runs on a 2-core CPU in minutes; its 17 grey levels fit in 4 bits.
PAPER = dict(levels=3, steps=32, hidden=512, n_bits=8, batch_size=64, lr=1e-3, warmup=2000,
             epochs=100, eval_every=2000, sample_every=2000)
DEFAULTS = {
    "digits": dict(levels=2, steps=8, hidden=64, n_bits=4, batch_size=64, lr=1e-3, warmup=200,
                   epochs=50, eval_every=250, sample_every=500),
    "mnist": dict(PAPER, levels=2, steps=16, hidden=256, eval_every=1000, sample_every=1000),
    "cifar10": PAPER, "imagenet32": PAPER,
    "imagenet64": dict(PAPER, levels=4),
    "celeba": dict(PAPER, levels=4, n_bits=5), "folder": dict(PAPER, levels=4, n_bits=5),
}
FIXED_DEFAULTS = dict(dataset="digits", invconv="finc", coupling="affine", k=3, seed=0)
MAX_BAD_STEPS = 20   # this many non-finite steps in a row stop the run


def parse_args(argv=None):
    defaults = "\n".join(f"  {name:<11}" + " ".join(f"{key}={value}" for key, value in values.items())
                         for name, values in DEFAULTS.items())
    parser = argparse.ArgumentParser(
        prog="python -m train.run", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1] + "\nDefaults per data set (options override them):\n"
        + defaults, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--dataset", choices=DATASETS,
        help="data set (default: digits, bundled with scikit-learn, needs no files)")
    add("--data-dir", help="folder holding the data set's files (default ~/.cache/nfcore/<name>)")
    add("--download", action="store_true", help="fetch cifar10 / mnist when missing (checksummed)")
    add("--image-size", type=int, help="celeba / folder: resize images to this size (default 64)")
    model = parser.add_argument_group("model (defaults depend on --dataset)")
    model.add_argument("--levels", type=int, help="L: levels of the multi-scale flow")
    model.add_argument("--steps", type=int, help="K: flow steps per level")
    model.add_argument("--hidden", type=int, help="width of the coupling networks")
    model.add_argument("--invconv", choices=STEP_KINDS,
                       help="flow step: finc (FInC unit + 1x1), cinc (CInC 3x3), emerging "
                            "(1x1 + Emerging conv), glow1x1 (1x1 only). Default finc")
    model.add_argument("--coupling", choices=COUPLINGS, help="default affine")
    model.add_argument("--k", type=int, help="kernel size of the k×k convolutions (default 3)")
    model.add_argument("--n-bits", type=int, help="bits per pixel the images are reduced to")
    opt = parser.add_argument_group("training (defaults depend on --dataset)")
    opt.add_argument("--batch-size", type=int)
    opt.add_argument("--lr", type=float, help="Adam learning rate")
    opt.add_argument("--warmup", type=int, help="linear learning-rate warm-up, in steps")
    opt.add_argument("--max-grad-norm", type=float, default=50.0, help="global-norm clipping")
    opt.add_argument("--ema", type=float, default=None, help="EMA decay of the weights used "
                                                             "for evaluation (e.g. 0.999)")
    opt.add_argument("--recompute", action="store_true",
                     help="memory-saving mode: backward rebuilds each layer's input with its "
                          "inverse instead of keeping every activation")
    opt.add_argument("--epochs", type=int, help="passes over the training set")
    opt.add_argument("--max-steps", type=int, help="stop after this many steps (overrides --epochs)")
    opt.add_argument("--time-budget", type=float, help="stop training after this many seconds")
    opt.add_argument("--eval-every", type=int, help="test bits/dim and a checkpoint every N steps")
    opt.add_argument("--sample-every", type=int, help="sample grids every N steps")
    add("--out", default="runs/latest", help="output folder (default runs/latest)")
    add("--resume", nargs="?", const="auto", metavar="CKPT",
        help="continue from CKPT (default: <out>/checkpoint.h5)")
    add("--seed", type=int, help="seed of weights, data order and noise (default 0)")
    add("--backend", default="cpu", choices=("cpu", "gpu"), help="cpu (NumPy + Numba) or gpu (CuPy)")
    add("--blas-threads", type=int, default=None, help=BLAS_THREADS_HELP)
    args = parser.parse_args(argv)
    args.given = {key for key, value in vars(args).items() if value is not None}
    for key, value in FIXED_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def make_config(args, image_shape):
    """The run's full config: the command line, filled with the data set's defaults."""
    config = dict(DEFAULTS[args.dataset])
    for key in ("levels", "steps", "hidden", "n_bits", "batch_size", "lr", "warmup", "epochs",
                "eval_every", "sample_every"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    config.update(dataset=args.dataset, image_shape=list(image_shape), invconv=args.invconv,
                  coupling=args.coupling, k=args.k, seed=args.seed, max_steps=args.max_steps,
                  max_grad_norm=args.max_grad_norm, ema=args.ema, image_size=args.image_size,
                  recompute=args.recompute)
    return config


def check_resume_matches(args, config):
    """Refuse to resume with a model or data setting that differs from the checkpoint's."""
    for key in MODEL_KEYS + ("n_bits", "batch_size", "dataset"):
        if key in args.given and getattr(args, key) != config[key]:
            raise SystemExit(f"error: the checkpoint was trained with --{key.replace('_', '-')} "
                             f"{config[key]}, not {getattr(args, key)}; drop the option to resume")


class Batches:
    """The training batch of any global step, as a pure function of (seed, step), so that a
    resumed run sees exactly the batches and noise an uninterrupted one would."""

    def __init__(self, images, batch_size, n_bits, seed):
        if len(images) < batch_size:
            raise SystemExit(f"error: the training set has {len(images)} images, fewer than "
                             f"--batch-size {batch_size}")
        self.images, self.batch_size, self.n_bits, self.seed = images, batch_size, n_bits, seed
        self.steps_per_epoch = len(images) // batch_size
        self._epoch, self._order = None, None

    def __call__(self, step):
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.images))
        chosen = self._order[index * self.batch_size:(index + 1) * self.batch_size]
        noise = np.random.default_rng([self.seed, 1, step])
        return to_device(preprocess(self.images[chosen], self.n_bits, noise))


def read_history(path, until_step):
    """The metrics already logged by a resumed run, up to its checkpoint's step."""
    if not os.path.exists(path):
        return []
    with open(path) as file:
        records = [json.loads(line) for line in file if line.strip()]
    return [r for r in records if r.get("step", 0) <= until_step]


def write_history(path, records):
    with open(path + ".tmp", "w") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")
    os.replace(path + ".tmp", path)


def train(args):
    nfcore.set_backend(args.backend)
    limit_blas_threads(args.blas_threads)
    checkpoint_path = os.path.join(args.out, "checkpoint.h5")
    resume_path = None
    if args.resume is not None:
        resume_path = checkpoint_path if args.resume == "auto" else args.resume
        if not os.path.exists(resume_path):
            raise SystemExit(f"error: --resume: no checkpoint at {resume_path}")

    if resume_path:
        flow, meta, arrays = load_flow(resume_path)
        config = meta["config"]
        check_resume_matches(args, config)
        for key in ("max_steps", "epochs", "eval_every", "sample_every"):   # may be extended
            if getattr(args, key) is not None:
                config[key] = getattr(args, key)
        train_images, test_images = load_dataset(config["dataset"], args.data_dir, args.download,
                                                 config["image_size"])
        step = meta["step"]
    else:
        train_images, test_images = load_dataset(args.dataset, args.data_dir, args.download,
                                                 args.image_size)
        config = make_config(args, train_images.shape[1:])
        flow = build_flow(config)
        step = 0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as file:
        json.dump(config, file, indent=2)

    n_bits, seed = config["n_bits"], config["seed"]
    batches = Batches(train_images, config["batch_size"], n_bits, seed)
    max_steps = config["max_steps"] or config["epochs"] * batches.steps_per_epoch
    if not resume_path:   # data-dependent initialization (ActNorm) on the first batch
        flow.forward(batches(0))
    optimizer = Adam(flow.layers, lr=config["lr"], warmup_steps=config["warmup"],
                     max_grad_norm=config["max_grad_norm"], ema_decay=config["ema"])
    if resume_path:
        optimizer.load_state_dict(optimizer_state(arrays, meta))

    metrics_path = os.path.join(args.out, "metrics.jsonl")
    history = read_history(metrics_path, step) if resume_path else []
    write_history(metrics_path, history)
    print(f"nfcore: {config['dataset']} {tuple(config['image_shape'])}, {config['invconv']} + "
          f"{config['coupling']} coupling, L={config['levels']} K={config['steps']} "
          f"hidden={config['hidden']}, {flow.n_params():,} parameters, {max_steps} steps, "
          f"out: {args.out}" + (f" (resumed at step {step})" if resume_path else ""), flush=True)

    def checkpoint():
        save_training_checkpoint(checkpoint_path, flow, optimizer,
                                 {"config": config, "step": step})

    def log(record):
        history.append(record)
        with open(metrics_path, "a") as file:
            file.write(json.dumps(record) + "\n")

    def evaluate():
        with optimizer.ema_parameters():
            return evaluate_bits_per_dim(flow, test_images, n_bits, config["batch_size"], seed)

    def samples():
        with optimizer.ema_parameters():
            for temperature in (0.7, 1.0):
                try:
                    save_samples(flow, os.path.join(args.out, f"samples_step{step}_t{temperature}.png"),
                                 64, temperature, n_bits, seed=[seed, 4, step])
                except NonFiniteError as error:      # a bad draw must not end the run
                    log({"step": step, "sampling_failed": str(error)})
                    progress.write(f"step {step}: {error}")

    def curve():
        save_curve({"train": [(r["step"], r["train_bpd"]) for r in history if "train_bpd" in r],
                    "test": [(r["step"], r["test_bpd"]) for r in history if "test_bpd" in r]},
                   os.path.join(args.out, "bpd.png"))

    started, bad_in_a_row, window = time.time(), 0, []
    progress = tqdm(total=max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                    disable=None)
    try:
        while step < max_steps:
            if args.time_budget and time.time() - started > args.time_budget:
                progress.write(f"time budget of {args.time_budget:.0f} s reached at step {step}")
                break
            tick = time.time()
            x = batches(step)
            optimizer.zero_grad()
            try:
                loss, _ = flow.loss_and_backward(x, n_bits, recompute=config.get("recompute", False))
                if not math.isfinite(loss):
                    raise NonFiniteError(f"loss is {loss}")
                grad_norm = optimizer.step()
                bad_in_a_row = 0
            except (NonFiniteError, FloatingPointError) as error:
                bad_in_a_row += 1
                log({"step": step, "skipped": str(error)})
                progress.write(f"step {step}: skipped ({error})")
                if bad_in_a_row >= MAX_BAD_STEPS:
                    raise SystemExit(f"error: {bad_in_a_row} steps in a row had NaN/Inf loss or "
                                     f"gradients; stopping. The last good checkpoint is "
                                     f"{checkpoint_path}. Try a lower --lr or --max-grad-norm.")
                step += 1
                continue
            step += 1
            window.append((loss, len(x) / (time.time() - tick)))
            progress.update(1)
            progress.set_postfix(bpd=f"{loss:.3f}", img_s=f"{window[-1][1]:.0f}")
            if step % 10 == 0 or step == max_steps:
                losses, speeds = zip(*window)
                log({"step": step, "epoch": step / batches.steps_per_epoch,
                     "train_bpd": float(np.mean(losses)), "lr": optimizer.learning_rate(),
                     "grad_norm": float(grad_norm), "images_per_s": float(np.mean(speeds)),
                     "time_s": time.time() - started})
                window = []
            if step % config["eval_every"] == 0 and step < max_steps:
                test_bpd = evaluate()
                log({"step": step, "test_bpd": test_bpd})
                progress.write(f"step {step}: test bpd {test_bpd:.4f}")
                checkpoint()
                curve()
            if step % config["sample_every"] == 0:
                samples()
    except KeyboardInterrupt:
        progress.write(f"interrupted at step {step}: saving a checkpoint to resume from")
        checkpoint()
        raise SystemExit(130)
    finally:
        progress.close()

    checkpoint()
    samples()
    print(f"evaluating on the whole test set ({len(test_images)} images)...", flush=True)
    test_bpd = evaluate()
    log({"step": step, "test_bpd": test_bpd})
    curve()
    final = {"test_bpd": test_bpd, "steps": step, "train_time_s": time.time() - started,
             "dataset": config["dataset"], "invconv": config["invconv"],
             "coupling": config["coupling"], "n_params": flow.n_params()}
    with open(os.path.join(args.out, "final.json"), "w") as file:
        json.dump(final, file, indent=2)
    print(f"test bits/dim: {test_bpd:.4f} ({config['dataset']}, {config['invconv']}, "
          f"{step} steps, {final['train_time_s']:.0f} s); results in {args.out}")
    return final


def main(argv=None):
    args = parse_args(argv)
    try:
        return train(args)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
