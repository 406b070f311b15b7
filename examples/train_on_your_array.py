"""Train a flow on your own images, a NumPy array, with the Python API; then sample from it.

    python examples/train_on_your_array.py       # add --small for the tiny sizes the tests use

Your data: uint8 images (N, C, H, W) with H and W divisible by 2^levels. Here the 8×8 digits
that come with scikit-learn stand in for them (1797 images, 16 grey levels).
"""
import sys

import numpy as np

from nfcore.flow import Flow         # nfcore first: before scikit-learn or torch (nfcore/threads.py)
from nfcore.optim import Adam
from data import postprocess, preprocess       # uint8 <-> float32 in [-0.5, 0.5), dequantized
from train.images import save_image_grid
from sklearn.datasets import load_digits

SMALL = "--small" in sys.argv
images = (load_digits().images * 255 / 16).astype(np.uint8)[:, None]    # (1797, 1, 8, 8) uint8
train, test = images[:1500], images[1500:]
n_bits = 4                                    # bits per pixel the model sees (digits have 16 levels)

flow = Flow(train.shape[1:], levels=2, steps=2 if SMALL else 8, hidden=8 if SMALL else 64,
            invconv="finc", coupling="affine")
optimizer = Adam(flow.layers, lr=1e-3, warmup_steps=50, max_grad_norm=50.0)
rng = np.random.default_rng(0)
for step in range(5 if SMALL else 400):
    x = preprocess(train[rng.integers(len(train), size=64)], n_bits, rng)   # a batch, new noise
    optimizer.zero_grad()
    loss, _ = flow.loss_and_backward(x, n_bits)   # mean bits/dim; gradients into every layer
    optimizer.step()
    if step % 100 == 0:
        print(f"step {step}: train bits/dim {loss:.3f}")

test_bpd = flow.bits_per_dim(preprocess(test, n_bits, rng), n_bits).mean()
print(f"test bits/dim {test_bpd:.3f} ({flow.n_params():,} parameters)")
samples = postprocess(flow.sample(16, temperature=0.7, rng=rng), n_bits)  # uint8 (16, 1, 8, 8)
save_image_grid(samples, "samples.png", scale=8)
print("16 samples -> samples.png")
