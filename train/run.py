"""Train a normalizing flow with invertible k×k convolutions, from the command line.

    python -m train.run                                   # digits, embedded, minutes on a CPU
    python -m train.run --dataset cifar10 --data-dir DIR  # the papers' model: L=3, K=32, 512
    python -m train.run --invconv cinc --coupling quad    # CInC Flow with Quad coupling
    python -m train.run --resume                          # continue the run in --out

Every run writes to --out: config.json, metrics.jsonl (one JSON line per log), bpd.png (train
and test bits/dim), samples_step<N>_t<T>.png (temperatures 0.7 and 1.0), checkpoint.h5
(written atomically: a crash leaves the previous one), final.json (test bits/dim over the whole
test set, with the weights train.evaluate and train.sample use by default: the EMA under --ema).
A step whose loss or gradients are NaN/Inf is skipped and logged; too many in a row stop the
run, keeping the last checkpoint. One run at a time per --out (a lock, <out>/.run.lock, that the
system releases when the process ends, however it ends): a second run there, or a --resume of a
running one, names the process holding the folder and exits with status 1. Ctrl-C (SIGINT) or
SIGTERM (kill, a batch scheduler) during training saves a checkpoint at the step reached, says so
in one line, and exits with status 130 (SIGINT) or 143 (SIGTERM); --resume continues from there.
A second signal while that checkpoint is saved waits for the save.

--resume continues exactly where the checkpoint stopped. It refuses a change to the model
(--levels --steps --hidden --invconv --coupling --scale-bound --k --seed) or the data
(--dataset --n-bits --batch-size --image-size), naming the option. The training options (--lr --warmup
--max-grad-norm --ema --recompute/--no-recompute --epochs --max-steps --eval-every
--sample-every --guard) may change: the new values apply from the resumed step on, are printed, logged
in metrics.jsonl and recorded in config.json; --guard 0 turns the guard off.
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
from data import DATASETS, Batches, load_dataset
from data.mnist import DEBIAN_FASHION_MNIST_DIR
from nfcore.backend import get_array_module, to_device
from nfcore.flow import COUPLINGS, STEP_KINDS
from nfcore.conditioning import InverseAccuracyError, guard_conditioning
from nfcore.layers import NonFiniteError
from nfcore.optim import Adam

from . import distributed
from .files import lock_folder, remove_temporaries, write_all_atomically, write_atomically
from .cli import (BLAS_THREADS_HELP, ArgumentParser, at_least, in_range, interruption,
                  limit_blas_threads, positive_float, positive_int, raise_requested_stop,
                  run_command, signals_deferred, stop_requests)
from .images import save_bpd_plot
from .monitor import RECON_THRESHOLD, check_reconstruction, reconstruction_batch
from .session import (MODEL_KEYS, build_flow, config_problem, evaluate_bits_per_dim, load_flow,
                      optimizer_state, save_samples, save_training_checkpoint)

# Per-dataset defaults. cifar10 / imagenet: the published architecture (L=3 levels, K=32 steps,
# coupling width 512, Adam lr 1e-3 with warm-up, 8 bits). digits: small and fast, so that the
# main job runs on a 2-core CPU in minutes; its 17 grey levels (0..16) are kept to 16 (4 bits):
# 16 maps to the top level, as 15 does.
PAPER = dict(levels=3, steps=32, hidden=512, n_bits=8, batch_size=64, lr=1e-3, warmup=2000,
             epochs=100, eval_every=2000, sample_every=2000)
# mnist and fashion-mnist: the same number and size of grey images, the same model.
MNIST = dict(PAPER, levels=2, steps=16, hidden=256, eval_every=1000, sample_every=1000)
DEFAULTS = {
    "digits": dict(levels=2, steps=8, hidden=64, n_bits=4, batch_size=64, lr=1e-3, warmup=200,
                   epochs=50, eval_every=250, sample_every=500),
    "mnist": MNIST, "fashion-mnist": MNIST,
    "cifar10": PAPER, "imagenet32": PAPER,
    "imagenet64": dict(PAPER, levels=4),
    "celeba": dict(PAPER, levels=4, n_bits=5), "folder": dict(PAPER, levels=4, n_bits=5),
}
FIXED_DEFAULTS = dict(dataset="digits", invconv="finc", coupling="affine", k=3, seed=0,
                      max_grad_norm=50.0, recompute=False)
DATASET_KEYS = ("levels", "steps", "hidden", "n_bits", "batch_size", "lr", "warmup", "epochs",
                "eval_every", "sample_every")
# --resume: what a checkpoint fixes, and what may change from the resumed step on.
RESUME_REFUSED = MODEL_KEYS + ("dataset", "n_bits", "batch_size", "image_size")
RESUME_APPLIED = ("lr", "warmup", "max_grad_norm", "ema", "recompute", "epochs", "max_steps",
                  "eval_every", "sample_every", "guard")
GUARD_EVERY = 10     # steps between two runs of the conditioning guard (--guard)
MAX_BAD_STEPS = 20   # this many non-finite steps in a row stop the run
TEMPERATURES = (0.7, 1.0)


# ---- the command line ------------------------------------------------------------------------
def parse_args(argv=None):
    name_width = max(len(name) for name in DEFAULTS) + 1
    defaults = "\n".join(f"  {name:<{name_width}}"
                         + " ".join(f"{key}={value}" for key, value in values.items())
                         for name, values in DEFAULTS.items())
    parser = ArgumentParser(
        prog="python -m train.run", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1] + "\nDefaults per data set (options override them):\n"
        + defaults, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--dataset", choices=DATASETS,
        help="data set (default: digits, bundled with scikit-learn, needs no files)")
    add("--data-dir", help="folder holding the data set's files (default ~/.cache/nfcore/<name>; "
                           f"fashion-mnist: Debian's {DEBIAN_FASHION_MNIST_DIR} first)")
    add("--download", action="store_true",
        help="fetch cifar10 / mnist / fashion-mnist when missing (checksummed)")
    add("--image-size", type=positive_int,
        help="celeba / folder: resize images to this size (default 64)")
    model = parser.add_argument_group("model (defaults depend on --dataset; fixed on --resume)")
    model.add_argument("--levels", type=positive_int, help="L >= 1: levels of the multi-scale flow")
    model.add_argument("--steps", type=positive_int, help="K >= 1: flow steps per level")
    model.add_argument("--hidden", type=positive_int, help="width of the coupling networks (>= 1)")
    model.add_argument("--invconv", choices=STEP_KINDS,
                       help="flow step: finc (FInC unit + 1x1), cinc (CInC kxk), emerging "
                            "(1x1 + the Emerging conv of size k as published: two (k+1)/2 x "
                            "(k+1)/2 convolutions, 2x2 for k=3, a kxk receptive field like "
                            "finc and cinc; k must be odd), glow1x1 (1x1 only). Default finc")
    model.add_argument("--coupling", choices=COUPLINGS, help="default affine")
    model.add_argument("--scale-bound", type=positive_float, metavar="C",
                       help="bound the affine couplings' scale: log s squashed into [-C, 0], so "
                            "their inverse multiplies errors by at most e^C on any input "
                            "(nfcore/layers/coupling.py; e.g. --scale-bound 1, what kept the "
                            "digits model invertible at 4x its size in bench/guard.py). Default "
                            "off: Glow's s = sigmoid(raw + 2), unbounded below")
    model.add_argument("--k", type=positive_int,
                       help="kernel size of the k×k convolutions, >= 1 (default 3)")
    model.add_argument("--n-bits", type=in_range(1, 8, int),
                       help="bits per pixel the images are reduced to, 1 to 8")
    opt = parser.add_argument_group(
        "training (defaults depend on --dataset; --batch-size is fixed on --resume, the others "
        "may change there and apply from the resumed step on)")
    opt.add_argument("--batch-size", type=positive_int, help="images per step (>= 1)")
    opt.add_argument("--lr", type=positive_float, help="Adam learning rate (> 0)")
    opt.add_argument("--warmup", type=at_least(0),
                     help="linear learning-rate warm-up, in steps (>= 0)")
    opt.add_argument("--max-grad-norm", type=positive_float,
                     help="global-norm gradient clipping (> 0; default 50)")
    opt.add_argument("--ema", type=in_range(0.0, 1.0, high_open=True),
                     help="keep an exponential moving average of the weights with this decay, "
                          "in [0, 1) (e.g. 0.999); evaluation, samples, final.json, "
                          "train.evaluate and train.sample then use it")
    opt.add_argument("--recompute", action=argparse.BooleanOptionalAction,
                     help="memory-saving mode: every layer drops its activations after the "
                          "forward pass and backward rebuilds each layer's input with its "
                          "inverse (default off)")
    opt.add_argument("--epochs", type=positive_int, help="passes over the training set (>= 1)")
    opt.add_argument("--max-steps", type=positive_int,
                     help="stop after this many steps in all, >= 1 (overrides --epochs)")
    opt.add_argument("--time-budget", type=positive_float,
                     help="stop training after this many seconds (> 0)")
    opt.add_argument("--eval-every", type=positive_int,
                     help="test bits/dim and a checkpoint every N steps (>= 1)")
    opt.add_argument("--sample-every", type=positive_int, help="sample grids every N steps (>= 1)")
    opt.add_argument("--guard", type=at_least(0), metavar="SCALE",
                     help="conditioning guard: every 10 steps, scale down the off-centre taps of "
                          "any masked convolution whose inverse amplifies errors more than 10x "
                          "at SCALE times the training image size (nfcore.conditioning."
                          "guard_conditioning; e.g. --guard 4), in the trained weights and, "
                          "under --ema, in the averaged ones that evaluation and sampling use; "
                          "a layer it cannot bring within 10x is a warning, logged in "
                          "metrics.jsonl as guard_gave_up. Default off; --guard 0: off (e.g. on "
                          "--resume of a guarded run)")
    opt.add_argument("--recon-threshold", type=positive_float, default=RECON_THRESHOLD,
                     help="every evaluation logs recon_error = max |decode(encode(x)) - x| on a "
                          "fixed test batch (train/monitor.py); warn when it passes this, > 0 "
                          "(default %(default)g)")
    opt.add_argument("--stop-on-recon-error", action="store_true",
                     help="stop the run, keeping the checkpoint just written, when recon_error "
                          "passes --recon-threshold")
    add("--out", default="runs/latest", help="output folder (default runs/latest)")
    add("--resume", nargs="?", const="auto", metavar="CKPT",
        help="continue from CKPT (default: <out>/checkpoint.h5); see above for which options "
             "may change")
    add("--seed", type=at_least(0), help="seed of weights, data order and noise, >= 0 (default 0)")
    add("--backend", default="cpu", choices=("cpu", "gpu"), help="cpu (NumPy + Numba) or gpu (CuPy)")
    add("--blas-threads", type=positive_int, default=None, help=BLAS_THREADS_HELP)
    add("--distributed", action="store_true",
        help="data-parallel training over MPI, started as mpiexec -n N python -m train.run "
             "--distributed ... (needs pip install -e '.[mpi]'): --batch-size stays the global "
             "batch, split over the N ranks; one gradient Allreduce per step (NCCL on --backend "
             "gpu, one GPU per rank), its seconds logged as allreduce_s; rank 0 alone writes "
             "--out; the same result for any N (train/distributed.py)")
    args = parser.parse_args(argv)
    args.given = {key for key, value in vars(args).items() if value is not None}
    if args.guard == 0:           # off, stored as absent (given: it turns a resumed guard off)
        args.guard = None
    for key, value in FIXED_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.invconv == "emerging" and args.k % 2 == 0:
        parser.error(f"argument --k: --invconv emerging needs an odd k (two (k+1)/2 x (k+1)/2 "
                     f"convolutions), got {args.k}")
    return args


def make_config(args, image_shape):
    """The run's full config: the command line, filled with the data set's defaults."""
    config = dict(DEFAULTS[args.dataset])
    for key in DATASET_KEYS:
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    config.update(dataset=args.dataset, image_shape=list(image_shape), invconv=args.invconv,
                  coupling=args.coupling, k=args.k, seed=args.seed, max_steps=args.max_steps,
                  max_grad_norm=args.max_grad_norm, ema=args.ema, image_size=args.image_size,
                  recompute=args.recompute, guard=args.guard,
                  scale_bound=args.scale_bound)
    return config


def resume_config(args, config):
    """The config to continue with, and {key: (old, new)} for the training options changed.
    Raises ValueError for a changed model or data option (RESUME_REFUSED)."""
    for key in RESUME_REFUSED:
        if key in args.given and getattr(args, key) != config.get(key):
            raise ValueError(f"--resume: the checkpoint was trained with --{key.replace('_', '-')} "
                             f"{config.get(key)}, not {getattr(args, key)}; the model and data "
                             f"cannot change on resume (drop the option, or start a new run "
                             f"in another --out)")
    config = dict(config)
    changes = {}
    for key in RESUME_APPLIED:
        if key in args.given and getattr(args, key) != config.get(key):
            changes[key] = (config.get(key), getattr(args, key))
            config[key] = getattr(args, key)
    return config, changes


def check_loadable(config):
    """ValueError in one line unless a checkpoint of ``config`` would load back: the limits
    that loading a checkpoint checks (train/session.py: CONFIG_LIMITS, MAX_PARAMETERS), checked
    at start-up instead of after the training that wrote it."""
    problem = config_problem(config)
    if problem is not None:
        key, what = problem
        option = (f" (--{key.replace('_', '-')})" if key is not None else
                  " (--levels, --steps, --hidden, --k)")
        raise ValueError(f"the run's config {what}{option}: its checkpoints could not be loaded "
                         f"back (the limits of train/session.py, CONFIG_LIMITS and "
                         f"MAX_PARAMETERS)")


def prepare_out(out):
    """Create the output folder, or say in one line why it cannot be."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except NotADirectoryError:
        raise ValueError(f"--out {out}: a part of the path is a file, not a folder") from None
    except OSError as error:
        raise ValueError(f"--out {out}: cannot create the folder ({error.strerror})") from None


# ---- metrics.jsonl ---------------------------------------------------------------------------
class Metrics:
    """The run's log: one JSON record per line in ``path``, also kept in ``records``."""

    def __init__(self, path, write=True):
        self.path, self.records, self.write = path, [], write     # write: False on ranks > 0

    def restart(self, until_step):
        """Keep the records of a resumed run up to its checkpoint's step (the caller rewrites
        the file with ``save``, once nothing else can fail). A torn last line (a crash
        mid-write) is dropped with a note; a bad line elsewhere is an error naming the file and
        the line."""
        records = []
        if not self.write:
            return
        if os.path.exists(self.path):
            with open(self.path) as file:
                lines = [line for line in file.read().split("\n") if line.strip()]
            for number, line in enumerate(lines, 1):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    if number < len(lines):
                        raise ValueError(f"{self.path}, line {number}: not a JSON record "
                                         f"({error})") from None
                    print(f"note: {self.path}: dropped its torn last line (a crash while it "
                          f"was written)", file=sys.stderr)
        self.records = [r for r in records if r.get("step", 0) <= until_step]

    def save(self, file):
        """Write every record to ``file`` (the whole of metrics.jsonl)."""
        for record in self.records:
            file.write(json.dumps(record) + "\n")

    def log(self, record):
        self.records.append(record)
        if not self.write:
            return
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")

    def series(self, key):
        return [(r["step"], r[key]) for r in self.records if key in r]


# ---- one training run ------------------------------------------------------------------------
class Run:
    """A run's model, optimizer, data and outputs, and what it does at its milestones."""

    def __init__(self, args, communicator=None):
        """``communicator``: this rank's train.distributed.Communicator, or None (one process)."""
        self.communicator = communicator
        self.writes = communicator is None or communicator.is_root   # rank 0 alone writes, prints
        self.out = args.out
        self.checkpoint_path = os.path.join(args.out, "checkpoint.h5")
        resume_path = None
        if args.resume is not None:
            resume_path = self.checkpoint_path if args.resume == "auto" else args.resume
            if not os.path.exists(resume_path):
                raise ValueError(f"--resume: no checkpoint at {resume_path}")
        self.lock = None
        if self.writes:           # one run per --out (train/files.py), before anything is read
            prepare_out(args.out)
            self.lock = lock_folder(args.out)
        try:
            self._start(args, resume_path)
        except BaseException:
            self.release()
            raise

    def release(self):
        """Let another run have --out (the OS does it too when the process ends)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def _start(self, args, resume_path):
        """The model, data, optimizer and outputs of a new or resumed run (``__init__``)."""
        communicator = self.communicator
        self.resumed = resume_path is not None
        changes = {}
        if self.resumed:
            self.flow, meta, arrays = load_flow(resume_path, weights="raw")
            self.config, changes = resume_config(args, meta["config"])
            check_loadable(self.config)
            self.step = meta["step"]
        else:
            self.config, self.step = None, 0
        if not self.resumed:      # the options' own limits before the data are read (a huge
            check_loadable(make_config(args, (1, 1, 1)))      # --image-size would be resized to)
        config = self.config
        dataset = config["dataset"] if self.resumed else args.dataset
        image_size = config["image_size"] if self.resumed else args.image_size
        def load():
            return load_dataset(dataset, args.data_dir, args.download, image_size)
        train_images, self.test_images = load() if communicator is None else \
            distributed.load_data(communicator, load, args.download)
        if not self.resumed:
            config = self.config = make_config(args, train_images.shape[1:])
            check_loadable(config)
            self.flow = build_flow(config)
        if communicator is not None:
            communicator.check_same("code", distributed.code_digest())
            communicator.check_same("config", distributed.config_digest(config))
        if self.writes:
            removed = remove_temporaries(args.out)
            if removed:
                print(f"note: removed {len(removed)} temporary file(s) a killed save left in "
                      f"{args.out}", file=sys.stderr)

        self.batches = Batches(train_images, config["batch_size"], config["n_bits"], config["seed"])
        if communicator is not None:
            distributed.check_batch_size(config["batch_size"], communicator.size)
        self.rows = None if communicator is None else communicator.rows(config["batch_size"])
        self.max_steps = config["max_steps"] or config["epochs"] * self.batches.steps_per_epoch
        if not self.resumed:      # data-dependent initialization (ActNorm) on the first batch
            if communicator is None:
                self.flow.forward(self.batch(0))
            else:                 # from the global batch's statistics
                distributed.initialize_actnorms(self.flow, communicator, self.batch(0))
        self.optimizer = Adam(self.flow.layers, lr=config["lr"], warmup_steps=config["warmup"],
                              max_grad_norm=config["max_grad_norm"], ema_decay=config["ema"])
        if self.resumed:
            self.optimizer.load_state_dict(optimizer_state(arrays, meta))
        self.recon_x = reconstruction_batch(self.test_images, config["batch_size"], config["n_bits"],
                                            config["seed"])
        self.recon_threshold, self.stop_on_recon = args.recon_threshold, args.stop_on_recon_error
        if communicator is not None:
            communicator.check_same("parameters", distributed.parameter_digest(self.flow.layers))
            self.reducer = distributed.GradientAllreduce(self.flow.layers, communicator)
        self.metrics = Metrics(os.path.join(args.out, "metrics.jsonl"), write=self.writes)
        self.metrics.restart(self.step if self.resumed else -1)
        if changes:
            self.metrics.records.append(
                {"step": self.step, "resumed_with": {k: new for k, (_, new) in changes.items()}})
        if self.writes:           # both or neither, once nothing else can fail (train/files.py)
            write_all_atomically({os.path.join(args.out, "config.json"):
                                  lambda file: json.dump(config, file, indent=2),
                                  self.metrics.path: self.metrics.save}, binary=False)
        if changes and self.writes:
            print("resumed with changed training options: " + ", ".join(
                f"--{k.replace('_', '-')} {'off' if old is None else old} -> "
                f"{'off' if new is None else new}" for k, (old, new) in changes.items()))
        self.started = time.time()
        self.guard_warned = False

    def describe(self):
        c = self.config
        return (f"nfcore: {c['dataset']} {tuple(c['image_shape'])}, {c['invconv']} + "
                f"{c['coupling']} coupling, L={c['levels']} K={c['steps']} hidden={c['hidden']}, "
                f"{self.flow.n_params():,} parameters, {self.max_steps} steps, out: {self.out}"
                + (f" (resumed at step {self.step})" if self.resumed else "")
                + (f", {self.communicator.size} ranks" if self.communicator is not None else ""))

    def batch(self, step):
        """The batch of ``step`` on the device; with N ranks, this rank's rows of it."""
        return to_device(self.batches(step, self.rows))

    def train_step(self, x):
        """One optimizer step on batch x: (mean bits/dim, gradient norm). Raises NonFiniteError
        naming the cause, bad data or a diverged model, and then changes no parameter."""
        self.optimizer.zero_grad()
        if self.communicator is not None:     # the global batch's loss and gradient, on every rank
            loss = distributed.distributed_loss_and_backward(
                self.flow, x, self.config["n_bits"], self.config["batch_size"], self.reducer,
                recompute=self.config.get("recompute", False))
            try:
                return loss, self.optimizer.step()
            except FloatingPointError as error:
                raise NonFiniteError(f"the model diverged, NaN/Inf in the flow: {error}") from None
        if not get_array_module(x).isfinite(x).all():
            raise NonFiniteError("the training batch holds NaN/Inf (bad input data)")
        try:                                 # the batch is finite: a NaN/Inf is divergence
            with np.errstate(over="ignore", invalid="ignore"):      # reported here instead
                loss, _ = self.flow.loss_and_backward(x, self.config["n_bits"],
                                                      recompute=self.config.get("recompute", False))
                if not math.isfinite(loss):
                    raise NonFiniteError(f"the loss is {loss}")
                return loss, self.optimizer.step()
        except (NonFiniteError, FloatingPointError) as error:
            raise NonFiniteError(f"the model diverged, NaN/Inf in the flow: {error}") from None

    def guard(self, say):
        """--guard: ``guard_conditioning`` on the trained weights and, under --ema, on the
        averaged ones (what evaluation, samples and final.json use); logs what it rescaled, and
        a layer it gave up on (a warning, said once per run, logged every time)."""
        scale, record, gave_up = self.config["guard"], {}, []
        rescaled = guard_conditioning(self.flow, scale=scale, gave_up=gave_up)
        if rescaled:
            record["guard_rescaled"] = rescaled
        if self.optimizer.ema is not None:
            ema_gave_up = []
            with self.optimizer.ema_parameters():      # rescaled in place: kept in the EMA
                rescaled = guard_conditioning(self.flow, scale=scale, gave_up=ema_gave_up)
            if rescaled:
                record["guard_rescaled_ema"] = rescaled
            gave_up += [f"EMA weights, {line}" for line in ema_gave_up]
        if gave_up:
            record["guard_gave_up"] = "; ".join(gave_up)
            if not self.guard_warned:
                self.guard_warned = True
                say(f"warning: step {self.step}: --guard gave up on {len(gave_up)} layer(s) "
                    f"({gave_up[0]}{'; ...' if len(gave_up) > 1 else ''}); training goes on, "
                    f"later ones are logged in metrics.jsonl as guard_gave_up")
        if record:
            self.metrics.log({"step": self.step, **record})

    def checkpoint(self):
        if not self.writes:
            return
        with signals_deferred():       # Ctrl-C / SIGTERM take effect once the file is whole
            save_training_checkpoint(self.checkpoint_path, self.flow, self.optimizer,
                                     {"config": self.config, "step": self.step})

    def evaluate(self):
        """Test bits/dim over the whole test set, with the EMA weights when the run keeps them.
        With N ranks: each test batch split over them, after checking that their parameters
        are still identical."""
        if self.communicator is not None:
            self.communicator.check_same("parameters", distributed.parameter_digest(self.flow.layers))
            with self.optimizer.ema_parameters():
                return distributed.evaluate_bits_per_dim(
                    self.flow, self.test_images, self.config["n_bits"], self.config["batch_size"],
                    self.config["seed"], self.communicator)
        with self.optimizer.ema_parameters():
            return evaluate_bits_per_dim(self.flow, self.test_images, self.config["n_bits"],
                                         self.config["batch_size"], self.config["seed"])

    def reconstruction(self):
        """(recon_error, warning or None) on the fixed test batch, with the evaluation's weights."""
        with self.optimizer.ema_parameters():
            return check_reconstruction(self.flow, self.recon_x, self.recon_threshold)

    def act_on_reconstruction(self, recon_error, warning, say):
        """Say the warning; with --stop-on-recon-error, stop (after the checkpoint was written)."""
        if warning is None:
            return
        say(warning)
        if self.stop_on_recon:
            raise ValueError(f"stopping at step {self.step} (--stop-on-recon-error): recon_error "
                             f"{recon_error:.1e} > --recon-threshold {self.recon_threshold:g}; the "
                             f"checkpoint of this step is {self.checkpoint_path}")

    def samples(self, say):
        """Sample grids at each of TEMPERATURES; a draw that overflows is logged, not fatal."""
        if not self.writes:
            return
        seed = self.config["seed"]
        with self.optimizer.ema_parameters():
            for temperature in TEMPERATURES:
                path = os.path.join(self.out, f"samples_step{self.step}_t{temperature}.png")
                try:
                    save_samples(self.flow, path, 64, temperature, self.config["n_bits"],
                                 seed=[seed, 4, self.step])
                except (NonFiniteError, InverseAccuracyError) as error:
                    self.metrics.log({"step": self.step, "sampling_failed": str(error)})
                    say(f"step {self.step}: {error}")

    def curve(self):
        if not self.writes:
            return
        save_bpd_plot(self.metrics.records, os.path.join(self.out, "bpd.png"))

    def stop_for_bad_steps(self, count):
        kept = (f"The last good checkpoint is {self.checkpoint_path}"
                if os.path.isfile(self.checkpoint_path) else "No checkpoint was written yet")
        raise ValueError(f"{count} steps in a row had NaN/Inf loss or gradients (the last: "
                         f"{self.metrics.records[-1]['skipped']}); stopping. {kept}. Try a lower "
                         f"--lr or --max-grad-norm.")


def train_loop(run, time_budget=None):
    """Steps until run.max_steps (or the time budget): log every 10 steps, evaluate and
    checkpoint every eval_every, sample every sample_every. Ctrl-C or SIGTERM saves a checkpoint
    at the step reached (the signal is acted on between steps, ``cli.stop_requests``)."""
    progress = tqdm(total=run.max_steps, initial=run.step, desc="train", unit="step",
                    dynamic_ncols=True, disable=None if run.writes else True)
    say = progress.write if run.writes else (lambda text: None)
    try:
        with stop_requests() as requested:   # a signal is acted on between steps
            train_steps(run, time_budget, progress, say, requested)
    except KeyboardInterrupt as stop:          # Ctrl-C, or SIGTERM (cli.Terminated)
        what, status = interruption(stop)
        say(f"{what} at step {run.step}: saving a checkpoint to resume from")
        with signals_deferred(say, reraise=False):   # a second signal waits for the save
            run.checkpoint()
        raise SystemExit(status) from None
    finally:
        progress.close()


def train_steps(run, time_budget, progress, say, requested):
    """The steps of ``train_loop``; raises the stop a signal asked for (``requested``) at the
    start of the next step."""
    config = run.config
    bad_in_a_row, window = 0, []
    while run.step < run.max_steps:
        raise_requested_stop(requested)
        if time_budget and time.time() - run.started > time_budget:
            say(f"time budget of {time_budget:.0f} s reached at step {run.step}")
            break
        tick = time.time()
        x = run.batch(run.step)
        try:
            loss, grad_norm = run.train_step(x)
            bad_in_a_row = 0
        except (NonFiniteError, FloatingPointError, InverseAccuracyError) as error:
            bad_in_a_row += 1
            run.metrics.log({"step": run.step, "skipped": str(error)})
            say(f"step {run.step}: skipped ({error})")
            if bad_in_a_row >= MAX_BAD_STEPS:
                run.stop_for_bad_steps(bad_in_a_row)
            run.step += 1
            continue
        run.step += 1
        if config.get("guard") and run.step % GUARD_EVERY == 0:
            run.guard(say)
        window.append((loss, run.batches.batch_size / (time.time() - tick)))
        progress.update(1)
        progress.set_postfix(bpd=f"{loss:.3f}", img_s=f"{window[-1][1]:.0f}")
        if run.step % 10 == 0 or run.step == run.max_steps:
            losses, speeds = zip(*window)
            record = {"step": run.step, "epoch": run.step / run.batches.steps_per_epoch,
                      "train_bpd": float(np.mean(losses)),
                      "lr": run.optimizer.learning_rate(), "grad_norm": float(grad_norm),
                      "images_per_s": float(np.mean(speeds)),
                      "time_s": time.time() - run.started}
            if run.communicator is not None:    # rank 0's seconds in the Allreduce since the last
                record["allreduce_s"] = run.reducer.take_seconds()    # record (waits included)
            run.metrics.log(record)
            window = []
        if run.step % config["eval_every"] == 0 and run.step < run.max_steps:
            test_bpd = run.evaluate()
            recon_error, warning = run.reconstruction()
            run.metrics.log({"step": run.step, "test_bpd": test_bpd, "recon_error": recon_error})
            say(f"step {run.step}: test bpd {test_bpd:.4f}, recon error {recon_error:.1e}")
            run.checkpoint()
            run.curve()
            run.act_on_reconstruction(recon_error, warning, say)
        if run.step % config["sample_every"] == 0:
            run.samples(say)


def finish(run):
    """The last checkpoint, samples, test bits/dim over the whole test set, final.json."""
    run.checkpoint()
    say = print if run.writes else (lambda *text, **options: None)
    run.samples(say)
    say(f"evaluating on the whole test set ({len(run.test_images)} images)...", flush=True)
    test_bpd = run.evaluate()
    recon_error, warning = run.reconstruction()
    run.metrics.log({"step": run.step, "test_bpd": test_bpd, "recon_error": recon_error})
    run.curve()
    if warning:
        say(warning)
    config = run.config
    final = {"test_bpd": test_bpd, "recon_error": recon_error, "steps": run.step, "train_time_s": time.time() - run.started,
             "dataset": config["dataset"], "invconv": config["invconv"],
             "coupling": config["coupling"], "n_params": run.flow.n_params(),
             "weights": "ema" if run.optimizer.ema is not None else "raw"}
    if run.writes:
        write_atomically(os.path.join(run.out, "final.json"),
                         lambda file: json.dump(final, file, indent=2), binary=False)
    say(f"test bits/dim: {test_bpd:.4f}, recon error {recon_error:.1e} ({config['dataset']}, {config['invconv']}, "
          f"{run.step} steps, {final['train_time_s']:.0f} s); results in {run.out}")
    return final


def train(args):
    if args.distributed:
        communicator = distributed.Communicator(args.backend)   # picks this rank's GPU first
        with distributed.abort_on_error(communicator):
            return train_on(args, communicator)
    return train_on(args)


def train_on(args, communicator=None):
    nfcore.set_backend(args.backend)
    limit_blas_threads(args.blas_threads)
    run = Run(args, communicator)
    try:
        if run.writes:
            print(run.describe(), flush=True)
        train_loop(run, args.time_budget)
        return finish(run)
    finally:
        run.release()


def main(argv=None):
    return run_command(train, parse_args(argv))


if __name__ == "__main__":
    main()
