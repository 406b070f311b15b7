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
import json
import math
import os
import sys
import time

import numpy as np
from tqdm import tqdm

import nfcore
from data import Batches, load_dataset
from nfcore.backend import get_array_module, to_device
from nfcore.conditioning import InverseAccuracyError, guard_conditioning
from nfcore.layers import NonFiniteError
from nfcore.optim import Adam

from . import distributed
from .files import lock_folder, remove_temporaries, write_all_atomically, write_atomically
from .cli import (interruption, limit_blas_threads, raise_requested_stop, run_command,
                  signals_deferred, stop_requests)
from .images import save_bpd_plot
from .monitor import check_reconstruction, reconstruction_batch
from .options import (DATASET_KEYS, DEFAULTS, build_parser, check_emerging_k,
                      fill_fixed_defaults, given_options)
from .session import (MODEL_KEYS, build_flow, config_problem, evaluate_bits_per_dim, load_flow,
                      optimizer_state, save_samples, save_training_checkpoint)

# --resume: what a checkpoint fixes, and what may change from the resumed step on.
RESUME_REFUSED = MODEL_KEYS + ("dataset", "n_bits", "batch_size", "image_size")
RESUME_APPLIED = ("lr", "warmup", "max_grad_norm", "ema", "recompute", "epochs", "max_steps",
                  "eval_every", "sample_every", "guard")
GUARD_EVERY = 10     # steps between two runs of the conditioning guard (--guard)
LOG_EVERY = 10       # steps between two training records in metrics.jsonl
MAX_BAD_STEPS = 20   # this many non-finite steps in a row stop the run
TEMPERATURES = (0.7, 1.0)


# ---- the command line ------------------------------------------------------------------------
def parse_args(argv=None):
    """The command line (train/options.py): ``given``, the options set (what --resume
    compares), then --guard 0 stored as off and FIXED_DEFAULTS filled in. The data set's
    defaults are filled in later, by ``make_config``."""
    parser = build_parser(__doc__)
    args = parser.parse_args(argv)
    args.given = given_options(args)
    if args.guard == 0:           # off, stored as absent (given: it turns a resumed guard off)
        args.guard = None
    fill_fixed_defaults(args)
    check_emerging_k(parser, args)
    return args


def option_name(key):
    """The command-line option of a config key: "max_grad_norm" -> "--max-grad-norm"."""
    return "--" + key.replace("_", "-")


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
            raise ValueError(f"--resume: the checkpoint was trained with {option_name(key)} "
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


def describe_changes(changes):
    """The line that says which training options a resumed run changed, old -> new."""
    def shown(value):
        return "off" if value is None else value
    return "resumed with changed training options: " + ", ".join(
        f"{option_name(key)} {shown(old)} -> {shown(new)}" for key, (old, new) in changes.items())


def check_loadable(config):
    """ValueError in one line unless a checkpoint of ``config`` would load back: the limits
    that loading a checkpoint checks (train/session.py: CONFIG_LIMITS, MAX_PARAMETERS), checked
    at start-up instead of after the training that wrote it."""
    problem = config_problem(config)
    if problem is not None:
        key, what = problem
        option = (f" ({option_name(key)})" if key is not None else
                  " (--levels, --steps, --hidden, --k)")
        raise ValueError(f"the run's config {what}{option}: its checkpoints could not be loaded "
                         f"back (the limits of train/session.py, CONFIG_LIMITS and "
                         f"MAX_PARAMETERS)")


# ---- the output folder -----------------------------------------------------------------------
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


def checkpoint_to_resume(args, checkpoint_path):
    """The checkpoint --resume continues from (``checkpoint_path`` for a plain --resume), or
    None without --resume; ValueError when it does not exist."""
    if args.resume is None:
        return None
    path = checkpoint_path if args.resume == "auto" else args.resume
    if not os.path.exists(path):
        raise ValueError(f"--resume: no checkpoint at {path}")
    return path


def remove_killed_saves(out):
    """Remove the temporary files a killed save left in ``out``, with a note if there were any."""
    removed = remove_temporaries(out)
    if removed:
        print(f"note: removed {len(removed)} temporary file(s) a killed save left in "
              f"{out}", file=sys.stderr)


def json_writer(value):
    """What writes ``value`` as indented JSON to a text file (for train/files.py's writes)."""
    return lambda file: json.dump(value, file, indent=2)


def silent(*text, **options):
    """What a rank other than 0 says: nothing (it takes the place of print)."""


def diverged(error):
    """The NonFiniteError of a step whose NaN/Inf came from the model, not the data."""
    return NonFiniteError(f"the model diverged, NaN/Inf in the flow: {error}")


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
        resume_path = checkpoint_to_resume(args, self.checkpoint_path)
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

    # -- start-up: ``_start`` and its parts, in the order it calls them ------------------------
    def _start(self, args, resume_path):
        """The model, data, optimizer and outputs of a new or resumed run (``__init__``)."""
        self.resumed = resume_path is not None
        if self.resumed:
            changes, meta, arrays = self._restore(args, resume_path)
        else:
            self.step, changes = 0, {}
            # the options' own limits, before the data are read (a huge --image-size would be
            # resized to)
            check_loadable(make_config(args, (1, 1, 1)))
        train_images = self._load_data(args)
        if not self.resumed:
            self._build_model(args, train_images.shape[1:])
        if self.communicator is not None:
            self._check_same_code_and_config()
        if self.writes:
            remove_killed_saves(args.out)
        self._prepare_batches(train_images)
        if not self.resumed:
            self._initialize_actnorms()
        self._build_optimizer()
        if self.resumed:
            self.optimizer.load_state_dict(optimizer_state(arrays, meta))
        self._prepare_reconstruction_check(args)
        if self.communicator is not None:
            self._prepare_allreduce()
        self._start_metrics(args.out, changes)
        if self.writes:
            self._write_config_and_metrics(args.out)
        if changes and self.writes:
            print(describe_changes(changes))
        self.started = time.time()
        self.guard_warned = False

    def _restore(self, args, resume_path):
        """A resumed run's flow, config and step, from its checkpoint. Returns the training
        options changed ({key: (old, new)}) and the checkpoint's meta and arrays (the
        optimizer's state, loaded once the optimizer is built)."""
        self.flow, meta, arrays = load_flow(resume_path, weights="raw")
        self.config, changes = resume_config(args, meta["config"])
        check_loadable(self.config)
        self.step = meta["step"]
        return changes, meta, arrays

    def _load_data(self, args):
        """Read the data set (a resumed run's: the one its config names): sets ``test_images``,
        returns the training images. With N ranks, ``train.distributed.load_data``."""
        dataset = self.config["dataset"] if self.resumed else args.dataset
        image_size = self.config["image_size"] if self.resumed else args.image_size

        def load():
            return load_dataset(dataset, args.data_dir, args.download, image_size)
        if self.communicator is None:
            train_images, self.test_images = load()
        else:
            train_images, self.test_images = distributed.load_data(self.communicator, load,
                                                                   args.download)
        return train_images

    def _build_model(self, args, image_shape):
        """A new run's config (``make_config``), checked, and its flow."""
        self.config = make_config(args, image_shape)
        check_loadable(self.config)
        self.flow = build_flow(self.config)

    def _check_same_code_and_config(self):
        """With N ranks: the same code and the same config on every rank (RanksDisagree
        otherwise)."""
        self.communicator.check_same("code", distributed.code_digest())
        self.communicator.check_same("config", distributed.config_digest(self.config))

    def _prepare_batches(self, train_images):
        """The training batch of each step (``batch``), this rank's rows of it with N ranks,
        and the number of steps of the run (``max_steps``)."""
        config, communicator = self.config, self.communicator
        self.batches = Batches(train_images, config["batch_size"], config["n_bits"], config["seed"])
        if communicator is not None:
            distributed.check_batch_size(config["batch_size"], communicator.size)
        self.rows = None if communicator is None else communicator.rows(config["batch_size"])
        self.max_steps = config["max_steps"] or config["epochs"] * self.batches.steps_per_epoch

    def _initialize_actnorms(self):
        """A new run's data-dependent initialization (ActNorm) on the first batch; with N
        ranks, from the global batch's statistics."""
        if self.communicator is None:
            self.flow.forward(self.batch(0))
        else:
            distributed.initialize_actnorms(self.flow, self.communicator, self.batch(0))

    def _build_optimizer(self):
        """Adam on the flow's parameters, with the config's training options."""
        config = self.config
        self.optimizer = Adam(self.flow.layers, lr=config["lr"], warmup_steps=config["warmup"],
                              max_grad_norm=config["max_grad_norm"], ema_decay=config["ema"])

    def _prepare_reconstruction_check(self, args):
        """The fixed test batch of ``reconstruction``, its threshold, and whether passing it
        stops the run (--recon-threshold, --stop-on-recon-error)."""
        config = self.config
        self.recon_x = reconstruction_batch(self.test_images, config["batch_size"],
                                            config["n_bits"], config["seed"])
        self.recon_threshold, self.stop_on_recon = args.recon_threshold, args.stop_on_recon_error

    def _prepare_allreduce(self):
        """With N ranks: the same parameters on every rank, and the gradient Allreduce of each
        step (``reducer``)."""
        self._check_same_parameters()
        self.reducer = distributed.GradientAllreduce(self.flow.layers, self.communicator)

    def _check_same_parameters(self):
        """With N ranks: the same parameters on every rank (RanksDisagree otherwise)."""
        self.communicator.check_same("parameters", distributed.parameter_digest(self.flow.layers))

    def _start_metrics(self, out, changes):
        """The run's log: a resumed run's records up to its step, then the training options
        changed on resume (kept in memory: ``_write_config_and_metrics`` writes the file)."""
        self.metrics = Metrics(os.path.join(out, "metrics.jsonl"), write=self.writes)
        self.metrics.restart(self.step if self.resumed else -1)
        if changes:
            self.metrics.records.append(
                {"step": self.step, "resumed_with": {k: new for k, (_, new) in changes.items()}})

    def _write_config_and_metrics(self, out):
        """config.json and metrics.jsonl: both or neither, once nothing else can fail
        (train/files.py)."""
        write_all_atomically({os.path.join(out, "config.json"): json_writer(self.config),
                              self.metrics.path: self.metrics.save}, binary=False)

    # -- training ----------------------------------------------------------------------------
    def describe(self):
        """The line a run starts with: its data, model, length and --out."""
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
                raise diverged(error) from None
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
            raise diverged(error) from None

    # -- milestones --------------------------------------------------------------------------
    def guard(self, say):
        """--guard: ``guard_conditioning`` on the trained weights and, under --ema, on the
        averaged ones (what evaluation, samples and final.json use); logs what it rescaled, and
        a layer it gave up on (a warning, said once per run, logged every time)."""
        record, gave_up = self._guard_weights(self.config["guard"])
        if gave_up:
            record["guard_gave_up"] = "; ".join(gave_up)
            self._warn_guard_gave_up(gave_up, say)
        if record:
            self.metrics.log({"step": self.step, **record})

    def _guard_weights(self, scale):
        """``guard_conditioning`` on the trained weights, then on the EMA ones if the run keeps
        them: (the record of what it rescaled, a line for each layer it gave up on)."""
        record, gave_up = {}, []
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
        return record, gave_up

    def _warn_guard_gave_up(self, gave_up, say):
        """The warning that the guard gave up on layers, said the first time only."""
        if self.guard_warned:
            return
        self.guard_warned = True
        say(f"warning: step {self.step}: --guard gave up on {len(gave_up)} layer(s) "
            f"({gave_up[0]}{'; ...' if len(gave_up) > 1 else ''}); training goes on, "
            f"later ones are logged in metrics.jsonl as guard_gave_up")

    def checkpoint(self):
        """checkpoint.h5 at the step reached (rank 0 only)."""
        if not self.writes:
            return
        with signals_deferred():       # Ctrl-C / SIGTERM take effect once the file is whole
            save_training_checkpoint(self.checkpoint_path, self.flow, self.optimizer,
                                     {"config": self.config, "step": self.step})

    def evaluate_and_log(self):
        """``evaluate`` and ``reconstruction``, logged in metrics.jsonl: (test bits/dim,
        recon_error, warning or None)."""
        test_bpd = self.evaluate()
        recon_error, warning = self.reconstruction()
        self.metrics.log({"step": self.step, "test_bpd": test_bpd, "recon_error": recon_error})
        return test_bpd, recon_error, warning

    def evaluate(self):
        """Test bits/dim over the whole test set, with the EMA weights when the run keeps them.
        With N ranks: each test batch split over them, after checking that their parameters
        are still identical."""
        if self.communicator is not None:
            self._check_same_parameters()
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
        """bpd.png, the train and test bits/dim so far (rank 0 only)."""
        if not self.writes:
            return
        save_bpd_plot(self.metrics.records, os.path.join(self.out, "bpd.png"))

    def stop_for_bad_steps(self, count):
        """Stop the run (ValueError) after ``count`` non-finite steps in a row."""
        kept = (f"The last good checkpoint is {self.checkpoint_path}"
                if os.path.isfile(self.checkpoint_path) else "No checkpoint was written yet")
        raise ValueError(f"{count} steps in a row had NaN/Inf loss or gradients (the last: "
                         f"{self.metrics.records[-1]['skipped']}); stopping. {kept}. Try a lower "
                         f"--lr or --max-grad-norm.")


# ---- the training loop -----------------------------------------------------------------------
def train_loop(run, time_budget=None):
    """Steps until run.max_steps (or the time budget): log every 10 steps, evaluate and
    checkpoint every eval_every, sample every sample_every. Ctrl-C or SIGTERM saves a checkpoint
    at the step reached (the signal is acted on between steps, ``cli.stop_requests``)."""
    progress = tqdm(total=run.max_steps, initial=run.step, desc="train", unit="step",
                    dynamic_ncols=True, disable=None if run.writes else True)
    say = progress.write if run.writes else silent
    try:
        with stop_requests() as requested:   # a signal is acted on between steps
            train_steps(run, time_budget, progress, say, requested)
    except KeyboardInterrupt as stop:          # Ctrl-C, or SIGTERM (cli.Terminated)
        checkpoint_and_exit(run, stop, say)
    finally:
        progress.close()


def checkpoint_and_exit(run, stop, say):
    """After Ctrl-C or SIGTERM (``stop``): a checkpoint at the step reached, then exit with
    status 130 or 143."""
    what, status = interruption(stop)
    say(f"{what} at step {run.step}: saving a checkpoint to resume from")
    with signals_deferred(say, reraise=False):   # a second signal waits for the save
        run.checkpoint()
    raise SystemExit(status) from None


def train_steps(run, time_budget, progress, say, requested):
    """The steps of ``train_loop``; raises the stop a signal asked for (``requested``) at the
    start of the next step."""
    bad_in_a_row = 0
    window = []      # (bits/dim, images/s) of each step since the last training record
    while run.step < run.max_steps:
        raise_requested_stop(requested)
        if time_budget and time.time() - run.started > time_budget:
            say(f"time budget of {time_budget:.0f} s reached at step {run.step}")
            break
        tick = time.time()
        x = run.batch(run.step)
        try:
            loss, grad_norm = run.train_step(x)
        except (NonFiniteError, FloatingPointError, InverseAccuracyError) as error:
            bad_in_a_row += 1
            skip_step(run, error, bad_in_a_row, say)
            continue
        bad_in_a_row = 0
        run.step += 1
        if run.config.get("guard") and run.step % GUARD_EVERY == 0:
            run.guard(say)
        window.append((loss, run.batches.batch_size / (time.time() - tick)))
        progress.update(1)
        progress.set_postfix(bpd=f"{loss:.3f}", img_s=f"{window[-1][1]:.0f}")
        if run.step % LOG_EVERY == 0 or run.step == run.max_steps:
            log_training(run, window, grad_norm)
            window = []
        reach_milestones(run, say)


def skip_step(run, error, bad_in_a_row, say):
    """A step whose loss or gradients were not finite (``error``): logged, said and skipped;
    the run stops when it is the MAX_BAD_STEPS-th in a row."""
    run.metrics.log({"step": run.step, "skipped": str(error)})
    say(f"step {run.step}: skipped ({error})")
    if bad_in_a_row >= MAX_BAD_STEPS:
        run.stop_for_bad_steps(bad_in_a_row)
    run.step += 1


def log_training(run, window, grad_norm):
    """The training record of the steps in ``window``: their mean bits/dim and images/s, the
    learning rate, the last step's gradient norm; with N ranks, the seconds in the Allreduce."""
    losses, speeds = zip(*window)
    record = {"step": run.step, "epoch": run.step / run.batches.steps_per_epoch,
              "train_bpd": float(np.mean(losses)),
              "lr": run.optimizer.learning_rate(), "grad_norm": float(grad_norm),
              "images_per_s": float(np.mean(speeds)),
              "time_s": time.time() - run.started}
    if run.communicator is not None:    # rank 0's seconds in the Allreduce since the last
        record["allreduce_s"] = run.reducer.take_seconds()    # record (waits included)
    run.metrics.log(record)


def reach_milestones(run, say):
    """After a step: evaluate and checkpoint every eval_every steps (the last step's are
    ``finish``'s), sample every sample_every."""
    if run.step % run.config["eval_every"] == 0 and run.step < run.max_steps:
        evaluate_and_checkpoint(run, say)
    if run.step % run.config["sample_every"] == 0:
        run.samples(say)


def evaluate_and_checkpoint(run, say):
    """Test bits/dim and recon_error, said and logged, a checkpoint, bpd.png; then the
    reconstruction warning (which may stop the run, --stop-on-recon-error)."""
    test_bpd, recon_error, warning = run.evaluate_and_log()
    say(f"step {run.step}: test bpd {test_bpd:.4f}, recon error {recon_error:.1e}")
    run.checkpoint()
    run.curve()
    run.act_on_reconstruction(recon_error, warning, say)


# ---- the end of a run ------------------------------------------------------------------------
def finish(run):
    """The last checkpoint, samples, test bits/dim over the whole test set, final.json."""
    run.checkpoint()
    say = print if run.writes else silent
    run.samples(say)
    say(f"evaluating on the whole test set ({len(run.test_images)} images)...", flush=True)
    test_bpd, recon_error, warning = run.evaluate_and_log()
    run.curve()
    if warning:
        say(warning)
    final = final_results(run, test_bpd, recon_error)
    if run.writes:
        write_atomically(os.path.join(run.out, "final.json"), json_writer(final), binary=False)
    say(f"test bits/dim: {test_bpd:.4f}, recon error {recon_error:.1e} ({run.config['dataset']}, "
        f"{run.config['invconv']}, {run.step} steps, {final['train_time_s']:.0f} s); results in "
        f"{run.out}")
    return final


def final_results(run, test_bpd, recon_error):
    """What final.json holds: the test bits/dim and recon_error over the whole test set, the
    run's length and time, its model, and which weights gave them."""
    config = run.config
    return {"test_bpd": test_bpd, "recon_error": recon_error, "steps": run.step,
            "train_time_s": time.time() - run.started,
            "dataset": config["dataset"], "invconv": config["invconv"],
            "coupling": config["coupling"], "n_params": run.flow.n_params(),
            "weights": "ema" if run.optimizer.ema is not None else "raw"}


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
