"""The options of ``python -m train.run``: the defaults per data set, and the argument parser,
built one group of options at a time (data, model, training, output, computing). train/run.py
parses the command line with them (``train.run.parse_args``)."""
import argparse

from data import DATASETS
from data.mnist import DEBIAN_FASHION_MNIST_DIR
from nfcore.flow import COUPLINGS, STEP_KINDS

from .cli import BLAS_THREADS_HELP, ArgumentParser, at_least, in_range, positive_float, positive_int
from .monitor import RECON_THRESHOLD

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
# The defaults that do not depend on the data set, filled in by ``fill_fixed_defaults``.
FIXED_DEFAULTS = dict(dataset="digits", invconv="finc", coupling="affine", k=3, seed=0,
                      max_grad_norm=50.0, recompute=False)
# The options whose defaults DEFAULTS gives (train.run.make_config fills them in).
DATASET_KEYS = ("levels", "steps", "hidden", "n_bits", "batch_size", "lr", "warmup", "epochs",
                "eval_every", "sample_every")


# ---- the parser ------------------------------------------------------------------------------
def build_parser(doc):
    """The parser of train.run's command line. ``doc``: train/run.py's docstring, whose first
    paragraph is the description and the rest the epilog, followed by the defaults per data set."""
    parser = ArgumentParser(
        prog="python -m train.run", description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[1] + "\nDefaults per data set (options override them):\n"
        + defaults_table(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_options(parser)
    add_model_options(parser)
    add_training_options(parser)
    add_output_options(parser)
    add_computing_options(parser)
    return parser


def defaults_table():
    """DEFAULTS as text, one line per data set: its name, then key=value for each default."""
    name_width = max(len(name) for name in DEFAULTS) + 1
    return "\n".join(f"  {name:<{name_width}}"
                     + " ".join(f"{key}={value}" for key, value in values.items())
                     for name, values in DEFAULTS.items())


def add_data_options(parser):
    """--dataset --data-dir --download --image-size: which images, and where they are."""
    add = parser.add_argument
    add("--dataset", choices=DATASETS,
        help="data set (default: digits, bundled with scikit-learn, needs no files)")
    add("--data-dir", help="folder holding the data set's files (default ~/.cache/nfcore/<name>; "
                           f"fashion-mnist: Debian's {DEBIAN_FASHION_MNIST_DIR} first)")
    add("--download", action="store_true",
        help="fetch cifar10 / mnist / fashion-mnist when missing (checksummed)")
    add("--image-size", type=positive_int,
        help="celeba / folder: resize images to this size (default 64)")


def add_model_options(parser):
    """The model group: --levels --steps --hidden --invconv --coupling --scale-bound --k
    --n-bits."""
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


def add_training_options(parser):
    """The training group: the optimizer's options, the run's length and milestones, and the
    checks of the model during training."""
    training = parser.add_argument_group(
        "training (defaults depend on --dataset; --batch-size is fixed on --resume, the others "
        "may change there and apply from the resumed step on)")
    add_optimizer_options(training)
    add_length_options(training)
    add_check_options(training)


def add_optimizer_options(group):
    """--batch-size --lr --warmup --max-grad-norm --ema --recompute: how each step is taken."""
    group.add_argument("--batch-size", type=positive_int, help="images per step (>= 1)")
    group.add_argument("--lr", type=positive_float, help="Adam learning rate (> 0)")
    group.add_argument("--warmup", type=at_least(0),
                       help="linear learning-rate warm-up, in steps (>= 0)")
    group.add_argument("--max-grad-norm", type=positive_float,
                       help="global-norm gradient clipping (> 0; default 50)")
    group.add_argument("--ema", type=in_range(0.0, 1.0, high_open=True),
                       help="keep an exponential moving average of the weights with this decay, "
                            "in [0, 1) (e.g. 0.999); evaluation, samples, final.json, "
                            "train.evaluate and train.sample then use it")
    group.add_argument("--recompute", action=argparse.BooleanOptionalAction,
                       help="memory-saving mode: every layer drops its activations after the "
                            "forward pass and backward rebuilds each layer's input with its "
                            "inverse (default off)")


def add_length_options(group):
    """--epochs --max-steps --time-budget --eval-every --sample-every: when the run stops, and
    its milestones."""
    group.add_argument("--epochs", type=positive_int, help="passes over the training set (>= 1)")
    group.add_argument("--max-steps", type=positive_int,
                       help="stop after this many steps in all, >= 1 (overrides --epochs)")
    group.add_argument("--time-budget", type=positive_float,
                       help="stop training after this many seconds (> 0)")
    group.add_argument("--eval-every", type=positive_int,
                       help="test bits/dim and a checkpoint every N steps (>= 1)")
    group.add_argument("--sample-every", type=positive_int,
                       help="sample grids every N steps (>= 1)")


def add_check_options(group):
    """--guard --recon-threshold --stop-on-recon-error: the checks of the model's invertibility."""
    group.add_argument("--guard", type=at_least(0), metavar="SCALE",
                       help="conditioning guard: every 10 steps, scale down the off-centre taps of "
                            "any masked convolution whose inverse amplifies errors more than 10x "
                            "at SCALE times the training image size (nfcore.conditioning."
                            "guard_conditioning; e.g. --guard 4), in the trained weights and, "
                            "under --ema, in the averaged ones that evaluation and sampling use; "
                            "a layer it cannot bring within 10x is a warning, logged in "
                            "metrics.jsonl as guard_gave_up. Default off; --guard 0: off (e.g. on "
                            "--resume of a guarded run)")
    group.add_argument("--recon-threshold", type=positive_float, default=RECON_THRESHOLD,
                       help="every evaluation logs recon_error = max |decode(encode(x)) - x| on a "
                            "fixed test batch (train/monitor.py); warn when it passes this, > 0 "
                            "(default %(default)g)")
    group.add_argument("--stop-on-recon-error", action="store_true",
                       help="stop the run, keeping the checkpoint just written, when recon_error "
                            "passes --recon-threshold")


def add_output_options(parser):
    """--out --resume --seed: where the run writes, what it continues from, its randomness."""
    add = parser.add_argument
    add("--out", default="runs/latest", help="output folder (default runs/latest)")
    add("--resume", nargs="?", const="auto", metavar="CKPT",
        help="continue from CKPT (default: <out>/checkpoint.h5); see above for which options "
             "may change")
    add("--seed", type=at_least(0), help="seed of weights, data order and noise, >= 0 (default 0)")


def add_computing_options(parser):
    """--backend --blas-threads --distributed: what computes, on how many threads and ranks."""
    add = parser.add_argument
    add("--backend", default="cpu", choices=("cpu", "gpu"),
        help="cpu (NumPy + Numba) or gpu (CuPy)")
    add("--blas-threads", type=positive_int, default=None, help=BLAS_THREADS_HELP)
    add("--distributed", action="store_true",
        help="data-parallel training over MPI, started as mpiexec -n N python -m train.run "
             "--distributed ... (needs pip install -e '.[mpi]'): --batch-size stays the global "
             "batch, split over the N ranks; one gradient Allreduce per step (NCCL on --backend "
             "gpu, one GPU per rank), its seconds logged as allreduce_s; rank 0 alone writes "
             "--out; the same result for any N (train/distributed.py)")


# ---- after parsing ---------------------------------------------------------------------------
def given_options(args):
    """The names of the options whose value is not None before FIXED_DEFAULTS are filled in:
    those given on the command line, and those with a default of their own (--out, --backend,
    --recon-threshold, the flags). What --resume compares."""
    return {key for key, value in vars(args).items() if value is not None}


def fill_fixed_defaults(args):
    """Set each option of FIXED_DEFAULTS left unset to its default."""
    for key, value in FIXED_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def check_emerging_k(parser, args):
    """--invconv emerging needs an odd --k: a one-line error (exit 1) otherwise."""
    if args.invconv == "emerging" and args.k % 2 == 0:
        parser.error(f"argument --k: --invconv emerging needs an odd k (two (k+1)/2 x (k+1)/2 "
                     f"convolutions), got {args.k}")
