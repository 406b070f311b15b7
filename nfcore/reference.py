"""Dense SciPy references: a layer's Jacobian as a matrix, its slogdet, the inverse by a dense
solve. Used by the tests, and by users who want proof that a layer does what it claims.

Everything here is float64 NumPy and meant for tiny shapes: the Jacobian of a (C, H, W) sample
is a D×D matrix with D = C·H·W, indices flattened in (c, i, j) order like ``x.reshape(B, -1)``.

- ``masked_conv_matrix(layer, H, W)``: the matrix of an InvConv / FInCUnit written straight from
  the definition of the padded convolution, entry by entry. It shares no code with the kernels.
- ``jacobian(layer, x)``: any layer's exact Jacobian per sample, row by row from its hand-written
  ``backward`` (row r is the gradient of output r). Exact up to rounding, not finite differences;
  check ``backward`` itself against finite differences (the tests do).
- ``check(layer, x)``: the worst log-det and inverse errors against these references.
"""
import numpy as np
import scipy.linalg

from .backend import to_numpy
from .layers.invconv import GroupedMaskedConv

# sign of the row / column offset of tap (a, b) for each corner: a top corner reads the rows
# i-(k-1)+a (above and at i), a bottom corner reads i+(k-1)-a (below and at i); likewise columns.
_TAP_DIRECTIONS = {"top-left": (-1, -1), "top-right": (-1, +1),
                   "bottom-left": (+1, -1), "bottom-right": (+1, +1)}


def masked_conv_matrix(layer, H, W):
    """The (C·H·W, C·H·W) matrix M of a masked convolution layer: y.flat = M @ x.flat.

    For group g (channels g·Cg ... (g+1)·Cg - 1) with padding corner (sr, sc)::

        M[(co, i, j), (ci, i + sr·(k-1-a), j + sc·(k-1-b))] += W_eff[g, co, ci, a, b]

    for every tap whose source pixel lies inside the image.
    """
    if not isinstance(layer, GroupedMaskedConv):
        raise TypeError(f"masked_conv_matrix needs an InvConv or FInCUnit, got {type(layer).__name__}")
    w = to_numpy(layer.effective_weight()).astype(np.float64)
    G, Cg, _, k, _ = w.shape
    C = G * Cg
    M = np.zeros((C, H, W, C, H, W))
    for g, corner in enumerate(layer.corners):
        sr, sc = _TAP_DIRECTIONS[corner]
        for i in range(H):
            for j in range(W):
                for a in range(k):
                    for b in range(k):
                        si, sj = i + sr * (k - 1 - a), j + sc * (k - 1 - b)
                        if 0 <= si < H and 0 <= sj < W:
                            rows = slice(g * Cg, (g + 1) * Cg)
                            M[rows, i, j, rows, si, sj] += w[g, :, :, a, b]
    return M.reshape(C * H * W, C * H * W)


def jacobian(layer, x):
    """(B, D_out, D_in) exact Jacobians dy/dx of each sample, from the layer's ``backward``.

    Runs forward once on the batch repeated D_out times, then backward with dy = one basis
    vector per copy; the layer's gradients are left as they were.
    """
    x = np.asarray(x, dtype=np.float64)
    B = x.shape[0]
    D_in = x[0].size
    y, _ = layer.forward(x)
    D_out = y[0].size
    x_repeated = np.repeat(x, D_out, axis=0)                       # (B·D_out, ...) sample-major
    y_repeated, _ = layer.forward(x_repeated)
    basis = np.tile(np.eye(D_out), (B, 1)).reshape(y_repeated.shape)
    saved = {name: g.copy() for name, g in layer.grads.items()}
    dx = layer.backward(basis, np.zeros(B * D_out))
    for name, g in saved.items():
        layer.grads[name][...] = g
    return to_numpy(dx).reshape(B, D_out, D_in)


def slogdet(matrices):
    """(sign, log|det|) of each matrix, via SciPy's LU (like numpy.linalg.slogdet)."""
    matrices = np.asarray(matrices)
    signs, logdets = [], []
    for M in matrices[None] if matrices.ndim == 2 else matrices:
        lu, pivots = scipy.linalg.lu_factor(M)
        diag = np.diag(lu)
        row_swaps = np.count_nonzero(pivots != np.arange(len(pivots)))   # each flips the sign
        signs.append(np.prod(np.sign(diag)) * (-1) ** row_swaps)
        logdets.append(np.sum(np.log(np.abs(diag))))
    return np.array(signs), np.array(logdets)


def dense_inverse(layer, y):
    """x solving layer(x) = y by a dense LU solve of each sample's Jacobian, for affine layers
    (a masked convolution, with or without a bias): layer(x) = M x + layer(0), so
    x = M⁻¹ (y − layer(0))."""
    y = np.asarray(to_numpy(y), dtype=np.float64)
    B, C, H, W = y.shape
    M = _matrix(layer, y)
    offset = to_numpy(layer.forward(np.zeros((1, C, H, W)))[0]).ravel()
    return np.stack([scipy.linalg.solve(M[n], y[n].ravel() - offset)
                     for n in range(B)]).reshape(y.shape)


def _matrix(layer, x):
    """The per-sample matrices of a layer: from the definition for masked convolutions."""
    B, C, H, W = x.shape
    if isinstance(layer, GroupedMaskedConv):
        return np.broadcast_to(masked_conv_matrix(layer, H, W), (B, C * H * W, C * H * W))
    return jacobian(layer, x)


def check(layer, x):
    """The worst errors of a layer at x against the dense references, as a dict:

    - "logdet": max |logdet − slogdet(J)| over the batch, J the dense Jacobian at x;
    - "inverse": max |layer.inverse(y) − x| / max |x|, with y = layer(x);
    - "dense_solve" (masked convolutions only): max |layer.inverse(y) − dense solve(y)| / max |x|.
    """
    x = np.asarray(to_numpy(x), dtype=np.float64)
    y, logdet = layer.forward(x)
    _, dense_logdet = slogdet(_matrix(layer, x))
    x_back = to_numpy(layer.inverse(y))
    scale = np.abs(x).max()
    errors = {"logdet": float(np.abs(to_numpy(logdet) - dense_logdet).max()),
              "inverse": float(np.abs(x_back - x).max() / scale)}
    if isinstance(layer, GroupedMaskedConv):
        errors["dense_solve"] = float(np.abs(x_back - dense_inverse(layer, y)).max() / scale)
    return errors


def check_layer(layer, x, perturb=0.0, eps=1e-6, seed=0):
    """The worst errors of any invertible layer at x (NumPy arrays): the checks that
    tests/test_layers.py runs on every layer, for users who want the same proof. A dict:

    - "inverse": max |inverse(forward(x)) − x| / max |x|, computed in x's dtype.
    Only for float64 x (dense Jacobians and finite differences need its precision):
    - "logdet": worst over the batch of |logdet − slogdet(J)| / max(1, |slogdet(J)|), with J
      the exact Jacobian from ``jacobian`` (the floor 1: a logdet of 0 is checked absolutely).
      For a Split, whose second output is log N(z2; mean, exp(logs)²) and not a logdet, the
      reference is SciPy's ``norm.logpdf`` at the prior's mean and scale.
    - "backward[x]" and "backward[<param>]": directional finite-difference checks (Chainer's
      check_backward) of L = Σ y·g + Σ logdet·h with random g, h, so that the dlogdet path is
      covered: for a random direction v, |<dL/dθ, v> − (L(θ+εv) − L(θ−εv))/2ε|
      / max(1, |<dL/dθ, v>|, |FD|); "backward": the worst of them. With ε = 1e-6 in float64
      the central difference's truncation error is O(ε²) ≈ 1e-12 and its rounding error
      ≈ 1e-16·|L|/ε ≈ 1e-10·|L|, both far below the 1e-6 the tests ask for.

    A layer with ReLU networks is only piecewise smooth: if a pre-activation happens to lie
    within ~ε of zero, the difference quotient straddles the kink and that entry fails with an
    O(1e-2) error without any bug (1 draw of the ~140 tried on the couplings at these sizes); rerun with
    another x or seed before suspecting backward.

    ``perturb`` > 0 first adds perturb · N(0, 1) to every parameter (this changes the layer),
    so that zero-initialized parts (Conv2dZero) do not make gradients trivially zero.
    The layer is run once on x first (building lazy weights, initializing ActNorm).
    """
    import scipy.stats

    from .layers.split import Split

    rng = np.random.default_rng(seed)
    is_split = isinstance(layer, Split)
    layer.forward(x)
    if perturb:
        for param in layer.params.values():
            param += (perturb * rng.standard_normal(param.shape)).astype(param.dtype)

    y, logdet = layer.forward(x)
    x_back = layer.inverse(y, z2=layer.z2) if is_split else layer.inverse(y)
    errors = {"inverse": float(np.abs(to_numpy(x_back) - to_numpy(x)).max() / np.abs(to_numpy(x)).max())}
    if x.dtype != np.float64:
        return errors

    if is_split:
        mean, logs = layer.prior_mean_logs(y)
        reference = scipy.stats.norm.logpdf(layer.z2, mean, np.exp(logs)).reshape(len(x), -1).sum(axis=1)
    else:
        _, reference = slogdet(jacobian(layer, x))
    errors["logdet"] = float((np.abs(logdet - reference) / np.maximum(1.0, np.abs(reference))).max())

    def loss(inputs):
        out, out_logdet = layer.forward(inputs)
        return float(np.sum(out * g) + np.sum(out_logdet * h))

    y, logdet = layer.forward(x)
    g, h = rng.standard_normal(y.shape), rng.standard_normal(logdet.shape)
    layer.zero_grad()
    dx = layer.backward(g, h)
    grads = {name: grad.copy() for name, grad in layer.grads.items()}

    def relative(analytic, numeric):
        return abs(analytic - numeric) / max(1.0, abs(analytic), abs(numeric))

    v = rng.standard_normal(x.shape)
    loss_plus, loss_minus = loss(x + eps * v), loss(x - eps * v)
    errors["backward[x]"] = relative(float(np.sum(dx * v)), (loss_plus - loss_minus) / (2 * eps))
    for name, param in layer.params.items():
        p0 = param.copy()
        v = rng.standard_normal(param.shape)
        param[...] = p0 + eps * v
        loss_plus = loss(x)
        param[...] = p0 - eps * v
        loss_minus = loss(x)
        param[...] = p0
        errors[f"backward[{name}]"] = relative(float(np.sum(grads[name] * v)),
                                               (loss_plus - loss_minus) / (2 * eps))
    errors["backward"] = max(value for key, value in errors.items() if key.startswith("backward["))
    return errors
