"""Load a checkpoint written by train.run; sample from it and interpolate between two images.

    python -m train.run                                           # writes runs/latest/checkpoint.h5
    python examples/sample_and_interpolate.py runs/latest/checkpoint.h5 [OUT_FOLDER]

The same as python -m train.sample and python -m train.interpolate, from Python.
"""
import os
import sys

import numpy as np

from data import load_dataset, postprocess, preprocess
from nfcore import latent
from train.images import save_image_grid
from train.session import load_flow

checkpoint = sys.argv[1] if len(sys.argv) > 1 else os.path.join("runs", "latest", "checkpoint.h5")
out = sys.argv[2] if len(sys.argv) > 2 else "."
flow, meta, _ = load_flow(checkpoint, weights="ema")   # the EMA weights when the run kept them
config = meta["config"]                                 # the run's options: data set, n_bits, ...
n_bits = config["n_bits"]
scale = max(1, 64 // config["image_shape"][-1])         # draw small images larger
rng = np.random.default_rng(0)

# Sampling: z ~ N(0, T²) at every level, then the exact inverse. Flow.sample checks its own
# inverse and raises InverseAccuracyError rather than return wrong images.
x = flow.sample(16, temperature=0.7, rng=rng)
print(f"16 samples, estimated rounding error {flow.last_sample_error:.1e}")
save_image_grid(postprocess(x, n_bits), os.path.join(out, "samples.png"), scale=scale)

# Interpolation: encode two test images to one latent vector each (every level's z joined),
# walk between them, decode. The ends are the images themselves, up to round-off.
_, test = load_dataset(config["dataset"], image_size=config.get("image_size"))
x = preprocess(test[:2], n_bits, rng)
z = latent.encode(flow, x)                                           # (2, C·H·W)
path = latent.decode(flow, latent.interpolate(z[0], z[1], steps=8, method="spherical"))
print(f"interpolation: ends off by {np.abs(path[[0, -1]] - x).max():.1e}")
save_image_grid(postprocess(path, n_bits), os.path.join(out, "interpolate.png"), columns=8,
                scale=scale)
print(f"-> {os.path.join(out, 'samples.png')}, {os.path.join(out, 'interpolate.png')}")
