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
    signs, logdets = [], []
    for M in np.atleast_3d(matrices) if np.ndim(matrices) == 3 else [matrices]:
        lu, _ = scipy.linalg.lu_factor(M)
        diag = np.diag(lu)
        signs.append(np.prod(np.sign(diag)))
        logdets.append(np.sum(np.log(np.abs(diag))))
    return np.array(signs), np.array(logdets)


def dense_inverse(layer, y):
    """x solving layer(x) = y by a dense LU solve of each sample's Jacobian (linear layers)."""
    y = np.asarray(to_numpy(y), dtype=np.float64)
    B, C, H, W = y.shape
    M = _matrix(layer, y)
    return np.stack([scipy.linalg.solve(M[n], y[n].ravel()) for n in range(B)]).reshape(y.shape)


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
