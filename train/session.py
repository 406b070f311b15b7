"""A trained model as the three command lines see it: a Flow built from a run's config, saved
and loaded with its optimizer state (the EMA weights or the raw ones), its test
bits/dim over a whole set, and its sample grids."""
import numpy as np

import nfcore

from data import iterate_test_batches, postprocess, preprocess
from nfcore.backend import default_array_module, to_device, to_numpy
from nfcore.conditioning import SAMPLE_TOLERANCE
from nfcore.flow import Flow
from nfcore.layers import NonFiniteError

from .checkpoint import load_checkpoint, save_checkpoint
from .cli import BLAS_THREADS_HELP, limit_blas_threads, positive_int
from .images import save_image_grid

MODEL_KEYS = ("levels", "steps", "hidden", "invconv", "coupling", "k", "seed", "scale_bound")
LATER_MODEL_KEYS = {"scale_bound": None}   # added after the first checkpoints: absent = this value


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


WEIGHTS_HELP = ("which weights to use: ema (default), the exponential moving average "
                "train.run evaluates and samples with when the run kept one (--ema), else the "
                "trained weights; raw: the trained weights themselves")


def load_flow(path, weights="raw"):
    """(flow, meta, arrays) from a checkpoint written by ``save_training_checkpoint``.

    weights: "raw", the trained parameters; "ema", their moving average when the run kept one
    (what train.run reports its test bits/dim with), else the trained parameters.
    Raises ValueError naming the path when the file does not hold a flow this code can build,
    or when a parameter is missing or has the wrong shape.
    """
    if weights not in ("raw", "ema"):
        raise ValueError(f"weights must be 'raw' or 'ema', got {weights!r}")
    arrays, meta = load_checkpoint(path)
    if "config" not in meta:
        raise ValueError(f"{path}: not a training checkpoint (no config in its metadata)")
    flow = build_flow(meta["config"])
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
