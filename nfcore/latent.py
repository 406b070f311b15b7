"""The latent space of a flow as a tool: encode, decode, interpolate, edit along a direction.

A multi-scale flow maps an image x (B, C, H, W) to L latents: the z2 each Split factors out
and z_top (``Flow.encode``). Together they hold exactly D = C·H·W numbers per image, and
``Flow.decode`` rebuilds x from them. Here the L latents of an image are flattened (C order)
and joined, level by level, into one vector, so that latent arithmetic is vector arithmetic::

    z = encode(flow, x)                 (B, D)   [z2 of Split 1 | ... | z2 of Split L−1 | z_top]
    x = decode(flow, z)                 (B, C, H, W)

Every operation below acts on all latents at once, every level's as well as z_top (as Glow
did), never on z_top alone: z_top holds only D / 2^(L−1) of the numbers (a quarter for L = 3),
so editing it alone leaves most of the image's description untouched.

Interpolation between two images' latents a, b (D,) at t ∈ [0, 1]::

    linear      z(t) = (1 − t)·a + t·b
    spherical   z(t) = sin((1 − t)·θ)/sin θ · a + sin(t·θ)/sin θ · b,   cos θ = a·b / (|a| |b|)

(spherical follows the great circle when |a| = |b|, keeping the norm a typical Gaussian
sample has, where the linear path dips towards the origin; it falls back to linear when a and
b are parallel). Both give exactly a at t = 0 and b at t = 1.

An attribute direction (Glow, section 5.2)::

    d = mean of z over the images with the attribute − mean of z over those without      (D,)

and an edit moves an image's latent by α·d: x_α = decode(z + α·d); α = 0 gives x back.

    from nfcore import latent
    z = latent.encode(flow, x)
    path = latent.interpolate(z[0], z[1], steps=8, method="spherical")     # (8, D)
    images = latent.decode(flow, path)
    direction = latent.attribute_direction(flow, batches)  # batches: (x, has_attribute) pairs
    edited = latent.manipulate(flow, x, direction.vector, alphas=[-1, 0, 1])  # (B, 3, C, H, W)
"""
from dataclasses import dataclass

import numpy as np

from .backend import get_array_module
from .layers import Split

METHODS = ("linear", "spherical")


def latent_shapes(flow):
    """Shapes (C', H', W') of one image's latents, in ``Flow.encode``'s order: the z2 of each
    Split (C − C//2 of its C channels), then z_top."""
    shapes = [(C - C // 2, H, W) for layer, (C, H, W) in flow.layer_input_shapes()
              if isinstance(layer, Split)]
    return shapes + [tuple(flow.top_shape)]


def join_latents(latents):
    """(B, D): each latent (B, C', H', W') flattened and all joined, in the given order."""
    return get_array_module(latents[0]).concatenate(
        [z.reshape(z.shape[0], -1) for z in latents], axis=1)


def split_latents(flow, z):
    """The latents of ``Flow.encode`` (a list of (B, C', H', W')) from joined vectors z (B, D)."""
    shapes = latent_shapes(flow)
    sizes = [int(np.prod(shape)) for shape in shapes]
    if z.ndim != 2 or z.shape[1] != sum(sizes):
        raise ValueError(f"latent vectors for this flow have shape (B, {sum(sizes)}), got "
                         f"{tuple(z.shape)}")
    latents, start = [], 0
    for shape, size in zip(shapes, sizes):
        latents.append(z[:, start:start + size].reshape((z.shape[0],) + shape))
        start += size
    return latents


def encode(flow, x):
    """(B, D) latent vectors of images x (B, C, H, W): every Split's z2 and z_top, joined."""
    return join_latents([latent.copy() for latent in flow.encode(x)])


def decode(flow, z):
    """Images (B, C, H, W) from latent vectors z (B, D) (the exact inverse of ``encode``)."""
    return flow.decode(split_latents(flow, z))


def reconstruct(flow, x):
    """decode(encode(x)): x again, up to the round-off of the forward and inverse passes."""
    return decode(flow, encode(flow, x))


def interpolate(a, b, steps=8, method="linear"):
    """(steps, D) latents on the path from a to b (each (D,)), at t = 0, 1/(steps−1), ..., 1.

    ``method``: "linear" or "spherical" (see the module docstring). Computed in float64 and
    returned in a's dtype; the first row is a and the last is b exactly.
    """
    if method not in METHODS:
        raise ValueError(f"unknown interpolation {method!r}: choose one of {', '.join(METHODS)}")
    if steps < 2:
        raise ValueError(f"an interpolation needs at least 2 steps (its two ends), got {steps}")
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"interpolate needs two latent vectors of one shape (D,), got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    xp = get_array_module(a)
    a64, b64 = a.astype(xp.float64), b.astype(xp.float64)
    t = xp.linspace(0.0, 1.0, steps)[:, None]                            # (steps, 1)
    weight_a, weight_b = 1.0 - t, t
    if method == "spherical":
        norms = float(xp.linalg.norm(a64)) * float(xp.linalg.norm(b64))
        cos_theta = float(a64 @ b64) / norms if norms > 0 else 1.0
        theta = float(np.arccos(np.clip(cos_theta, -1.0, 1.0)))
        if np.sin(theta) > 1e-6:                  # else (anti)parallel: the linear path
            weight_a = xp.sin((1.0 - t) * theta) / np.sin(theta)
            weight_b = xp.sin(t * theta) / np.sin(theta)
    return (weight_a * a64 + weight_b * b64).astype(a.dtype)


@dataclass
class Direction:
    """An attribute direction: ``vector`` (D,) float64 = mean latent of the ``n_with`` images
    with the attribute − mean latent of the ``n_without`` images without it."""
    vector: object
    n_with: int
    n_without: int


def attribute_direction(flow, batches, progress=None):
    """The attribute direction over ``batches``: an iterable of (x (B, C, H, W), has (B,) bool)
    pairs, ``has`` saying which images have the attribute. Sums in float64; ``progress`` (e.g.
    a tqdm bar) is advanced by each batch's size. Raises ValueError when either group is empty.
    """
    sum_with = sum_without = None
    n_with = n_without = 0
    for x, has in batches:
        xp = get_array_module(x)
        z = encode(flow, x).astype(xp.float64)
        has = xp.asarray(has, dtype=bool)
        if has.shape != (x.shape[0],):
            raise ValueError(f"has_attribute must be (B,) = ({x.shape[0]},) booleans, got "
                             f"shape {tuple(has.shape)}")
        if sum_with is None:
            sum_with, sum_without = xp.zeros(z.shape[1]), xp.zeros(z.shape[1])
        sum_with += z[has].sum(axis=0)
        sum_without += z[~has].sum(axis=0)
        n_with += int(has.sum())
        n_without += int((~has).sum())
        if progress is not None:
            progress.update(x.shape[0])
    if n_with == 0 or n_without == 0:
        raise ValueError(f"an attribute direction needs images with and without the attribute; "
                         f"got {n_with} with and {n_without} without")
    return Direction(sum_with / n_with - sum_without / n_without, n_with, n_without)


def manipulate(flow, x, direction, alphas):
    """(B, A, C, H, W): each image of x (B, C, H, W) decoded from z + α·direction for each of
    the A ``alphas``; α = 0 gives x back up to the round-off of encode and decode."""
    xp = get_array_module(x)
    z = encode(flow, x)
    direction = xp.asarray(direction, dtype=xp.float64)
    if direction.shape != (z.shape[1],):
        raise ValueError(f"the direction must be a latent vector ({z.shape[1]},), got shape "
                         f"{tuple(direction.shape)}")
    rows = [decode(flow, (z.astype(xp.float64) + alpha * direction).astype(z.dtype))
            for alpha in alphas]
    return xp.stack(rows, axis=1)
