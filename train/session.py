"""A trained model as the three command lines see it: a Flow built from a run's config, saved
and loaded with its optimizer state (the EMA weights or the raw ones), its test
bits/dim over a whole set, and its sample grids."""
import numpy as np

import nfcore

from data import DATASETS, iterate_test_batches, postprocess, preprocess
from nfcore.backend import default_array_module, to_device, to_numpy
from nfcore.conditioning import SAMPLE_TOLERANCE
from nfcore.flow import COUPLINGS, STEP_KINDS, Flow
from nfcore.layers import NonFiniteError

from .checkpoint import load_checkpoint, save_checkpoint
from .cli import BLAS_THREADS_HELP, limit_blas_threads, positive_int
from .images import save_image_grid

MODEL_KEYS = ("levels", "steps", "hidden", "invconv", "coupling", "k", "seed", "scale_bound")
LATER_MODEL_KEYS = {"scale_bound": None}   # added after the first checkpoints: absent = this value


# What a checkpoint's config may hold, checked before anything is built from it (a config
# edited to hidden=10**6 or 100000x100000 images would otherwise allocate without bound):
# key -> (type, lowest, highest); None means absent or off where the key is optional.
CONFIG_LIMITS = {
    "levels": (int, 1, 10), "steps": (int, 1, 1024), "hidden": (int, 1, 16384),
    "k": (int, 1, 63), "seed": (int, 0, 2 ** 63 - 1), "n_bits": (int, 1, 8),
    "batch_size": (int, 1, 65536), "warmup": (int, 0, 10 ** 9), "epochs": (int, 1, 10 ** 9),
    "max_steps": (int, 1, 10 ** 12), "eval_every": (int, 1, 10 ** 12),
    "sample_every": (int, 1, 10 ** 12), "guard": (int, 1, 64), "image_size": (int, 1, 4096),
    "lr": (float, 0.0, 1e3), "max_grad_norm": (float, 0.0, 1e300), "ema": (float, 0.0, 1.0),
    "scale_bound": (float, 0.0, 1e3),
}
OPTIONAL_CONFIG_KEYS = ("max_steps", "guard", "image_size", "ema", "scale_bound", "warmup",
                        "epochs", "eval_every", "sample_every", "lr", "max_grad_norm")
MAX_IMAGE_SIDE = 4096          # pixels, height and width of the model's images
MAX_PARAMETERS = 2 * 10 ** 8   # estimated (parameter_bound); the papers' models have < 10**8


def parameter_bound(config):
    """An upper bound on the number of parameters of ``build_flow(config)``, from the config
    alone (nothing built), per flow step on C channels (C = C₀·2^(level+2)) with h = hidden:
    the coupling networks (affine h² + 14·C·h + 2h + 3C; quad, three of them, 3h² + 27·C·h +
    6h + 6C), the invertible convolutions with ActNorm (finc k²C²/4 + 2C² + 3C; cinc k²C² + 4C;
    emerging ((k+1)²/2 + 2)·C² + 6C, both with their bias; glow1x1 2C² + 3C); per level the
    Split's prior, 5C²."""
    channels, levels = config["image_shape"][0], config["levels"]
    h, k, steps = config["hidden"], config["k"], config["steps"]
    total = 0
    for level in range(levels):
        C = channels * 2 ** (level + 2)
        coupling = (h * h + 14 * C * h + 2 * h + 3 * C if config["coupling"] == "affine"
                    else 3 * h * h + 27 * C * h + 6 * h + 6 * C)
        invertible = {"finc": k * k * C * C // 4 + 2 * C * C + 3 * C, "cinc": k * k * C * C + 4 * C,
                      "emerging": ((k + 1) ** 2 // 2 + 2) * C * C + 6 * C,
                      "glow1x1": 2 * C * C + 3 * C}[config["invconv"]]
        total += steps * (coupling + invertible) + 5 * C * C
    return total


def config_problem(config):
    """None when ``config`` describes a model this code can build within sane bounds
    (CONFIG_LIMITS, MAX_IMAGE_SIDE, MAX_PARAMETERS), else (key, what is wrong with it): the
    key (None for the parameter bound, which several keys make) and a phrase to follow "its
    config". What ``check_config`` refuses in a checkpoint, and train.run at start-up, so
    that a run never writes a checkpoint it cannot load back."""
    if not isinstance(config, dict):
        return None, f"is a {type(config).__name__}, not a JSON object"
    for key in MODEL_KEYS + ("image_shape", "n_bits", "batch_size", "dataset"):
        if key not in config and key not in LATER_MODEL_KEYS:
            return key, f"has no {key!r}"
    for key, (kind, low, high) in CONFIG_LIMITS.items():
        value = config.get(key)
        if value is None and (key in OPTIONAL_CONFIG_KEYS or key in LATER_MODEL_KEYS):
            continue
        number = isinstance(value, int) if kind is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not number or not low <= value <= high:
            return key, (f"has {key} = {value!r}, expected "
                         f"{'an integer' if kind is int else 'a number'} from {low} to {high:g}")
    shape = config["image_shape"]
    if not (isinstance(shape, list) and len(shape) == 3
            and all(isinstance(n, int) and not isinstance(n, bool) for n in shape)
            and shape[0] in (1, 3) and all(1 <= n <= MAX_IMAGE_SIDE for n in shape[1:])):
        return "image_shape", (f"has image_shape = {str(shape)[:60]}, expected [1 or 3, height, "
                               f"width] with sides from 1 to {MAX_IMAGE_SIDE}")
    for key, choices in (("invconv", STEP_KINDS), ("coupling", COUPLINGS), ("dataset", DATASETS)):
        if config[key] not in choices:
            return key, (f"has {key} = {str(config[key])[:40]!r}, expected one of "
                         f"{', '.join(choices)}")
    if config.get("recompute") not in (None, True, False):
        return "recompute", f"has recompute = {config['recompute']!r}, expected true or false"
    if parameter_bound(config) > MAX_PARAMETERS:
        return None, (f"describes a model of up to {parameter_bound(config):,} parameters (levels "
                      f"{config['levels']}, steps {config['steps']}, hidden {config['hidden']}, "
                      f"k {config['k']}); this code loads at most {MAX_PARAMETERS:,}")
    return None


def check_config(config, path):
    """ValueError naming ``path`` and the key unless a checkpoint's config describes a model
    this code can build within sane bounds (``config_problem``)."""
    problem = config_problem(config)
    if problem is not None:
        raise ValueError(f"{path}: its config {problem[1]}; not a checkpoint train.run wrote, "
                         f"or edited by hand")


def build_flow(config):
    """A Flow from a run's config (image_shape and the MODEL_KEYS)."""
    return Flow(tuple(config["image_shape"]),
                **{key: config[key] if key in config else LATER_MODEL_KEYS[key] for key in MODEL_KEYS})


def save_training_checkpoint(path, flow, optimizer, meta):
    """Parameters, layer states, optimizer state and ``meta`` (config, step, ...), atomically."""
    arrays = {}
    for index, layer in enumerate(flow.layers):
        for name, param in layer.params.items():
            arrays[f"model/{index}/{name}"] = to_numpy(param)
        for name, value in layer.state().items():
            arrays[f"state/{index}/{name}"] = np.asarray(to_numpy(value))
    optim_state = optimizer.state_dict() if optimizer is not None else {}
    for name, value in optim_state.items():
        if name != "step":
            arrays[f"optim/{name}"] = value
    meta = dict(meta, optimizer_step=optim_state.get("step"))
    save_checkpoint(path, arrays, meta)


DATA_DIR_HELP = ("folder of the checkpoint's data set (default ~/.cache/nfcore/<name>, the "
                 "default of train.run too; fashion-mnist: Debian's package folder first; "
                 "digits needs none). A checkpoint does not record the folder it was trained "
                 "from: a run trained with --data-dir needs it given again here")
WEIGHTS_HELP = ("which weights to use: ema (default), the exponential moving average "
                "train.run evaluates and samples with when the run kept one (--ema), else the "
                "trained weights; raw: the trained weights themselves")


def check_meta(meta, path):
    """ValueError naming ``path`` unless a checkpoint's meta is a training checkpoint's: a
    config within bounds (check_config), a step count, the optimizer's step count."""
    if "config" not in meta:
        raise ValueError(f"{path}: not a training checkpoint (no config in its metadata)")
    check_config(meta["config"], path)
    for key in ("step", "optimizer_step"):
        value = meta.get(key)
        if key == "optimizer_step" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 63:
            raise ValueError(f"{path}: its metadata has {key} = {str(value)[:40]}, expected "
                             f"a count >= 0")


def checkpoint_shapes(flow):
    """{name: shape} of every array ``save_training_checkpoint`` writes for ``flow`` (the
    optimizer's moments and EMA included): what ``load_flow`` reads, and nothing else."""
    shapes = {}
    for index, layer in enumerate(flow.layers):
        for name, param in layer.params.items():
            for prefix in ("model", "optim/m", "optim/v", "optim/ema"):
                shapes[f"{prefix}/{index}/{name}"] = tuple(param.shape)
        for name, value in layer.state().items():
            shapes[f"state/{index}/{name}"] = tuple(np.shape(to_numpy(value)))
    return shapes


def load_flow(path, weights="raw"):
    """(flow, meta, arrays) from a checkpoint written by ``save_training_checkpoint``.

    weights: "raw", the trained parameters; "ema", their moving average when the run kept one
    (what train.run reports its test bits/dim with), else the trained parameters.
    Raises ValueError naming the path when the file does not hold a flow this code can build,
    or when a parameter is missing or has the wrong shape.
    """
    if weights not in ("raw", "ema"):
        raise ValueError(f"weights must be 'raw' or 'ema', got {weights!r}")
    built = []

    def expected(meta):          # the model first, from a checked config; then what it reads
        check_meta(meta, path)
        built.append(build_flow(meta["config"]))
        return checkpoint_shapes(built[0])

    arrays, meta = load_checkpoint(path, expected)
    flow = built[0]
    use_ema = weights == "ema" and any(key.startswith("optim/ema/") for key in arrays)
    xp = default_array_module()
    for index, layer in enumerate(flow.layers):
        for name, param in layer.params.items():
            key = f"{'optim/ema' if use_ema else 'model'}/{index}/{name}"
            if key not in arrays:
                raise ValueError(f"{path}: parameter {key} is missing")
            if arrays[key].shape != tuple(param.shape):
                raise ValueError(f"{path}: parameter {key} has shape {arrays[key].shape}, the "
                                 f"model built from its config expects {tuple(param.shape)}")
            layer.params[name][...] = xp.asarray(arrays[key], dtype=param.dtype)
        prefix = f"state/{index}/"
        missing = [f"{prefix}{name}" for name in layer.state() if f"{prefix}{name}" not in arrays]
        if missing:
            raise ValueError(f"{path}: layer state {missing[0]} is missing")
        layer.load_state({key[len(prefix):]: (value.item() if value.ndim == 0 else value)
                          for key, value in arrays.items() if key.startswith(prefix)})
    meta = dict(meta, weights="ema" if use_ema else "raw")
    return flow, meta, arrays


def add_checkpoint_options(parser):
    """--weights, --backend and --blas-threads: how the tools that read a checkpoint (sample,
    evaluate, reconstruct, interpolate, manipulate) run its model."""
    parser.add_argument("--weights", default="ema", choices=("ema", "raw"), help=WEIGHTS_HELP)
    parser.add_argument("--backend", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--blas-threads", type=positive_int, default=None, help=BLAS_THREADS_HELP)


def open_checkpoint(args):
    """(flow, meta) of args.ckpt with args.weights, on args.backend, BLAS on args.blas_threads
    (the options of ``add_checkpoint_options``)."""
    nfcore.set_backend(args.backend)
    limit_blas_threads(args.blas_threads)
    flow, meta, _ = load_flow(args.ckpt, weights=args.weights)
    return flow, meta


def optimizer_state(arrays, meta):
    """The optimizer's state_dict stored in a checkpoint."""
    state = {key[len("optim/"):]: value for key, value in arrays.items() if key.startswith("optim/")}
    state["step"] = meta["optimizer_step"]
    return state


def evaluate_bits_per_dim(flow, images, n_bits, batch_size, seed, progress=None):
    """Mean bits/dim over every image of ``images`` (uint8 NCHW), with fixed dequantization
    noise (seeded), so that two evaluations of the same model agree exactly."""
    rng = np.random.default_rng([seed, 2])
    total, count = 0.0, 0
    for batch in iterate_test_batches(images, batch_size):
        x = to_device(preprocess(batch, n_bits, rng))
        try:
            total += float(to_numpy(flow.bits_per_dim(x, n_bits)).sum())
        except NonFiniteError as error:      # the data are finite: the model has diverged
            raise NonFiniteError(f"the model has diverged: its forward pass overflows to "
                                 f"NaN/Inf on images {count} to {count + len(batch) - 1} "
                                 f"({error})") from error
        count += len(batch)
        if progress is not None:
            progress.update(len(batch))
    return total / count


def sample_images(flow, n, temperature, n_bits, seed, tolerance=SAMPLE_TOLERANCE):
    """n uint8 images (n, C, H, W) drawn at ``temperature`` with a seeded generator, checked by
    ``Flow.sample`` to ``tolerance``."""
    rng = np.random.default_rng(seed)
    x = flow.sample(n, temperature=temperature, rng=rng, xp=default_array_module(), tolerance=tolerance)
    return postprocess(x, n_bits)


def save_samples(flow, path, n, temperature, n_bits, seed, tolerance=SAMPLE_TOLERANCE):
    """Draw n samples and save them as a PNG grid (small images drawn larger)."""
    images = sample_images(flow, n, temperature, n_bits, seed, tolerance)
    save_image_grid(images, path, scale=max(1, 64 // images.shape[-1]))
    return images
