"""Conv1x1: Glow's invertible 1×1 convolution, LU-parameterized.

Shapes: x, y (B, C, H, W); the same C×C matrix W mixes the channels of every pixel::

    y[n, :, i, j] = W @ x[n, :, i, j]
    W = P · L · U,   L = tril(lower, -1) + I,   U = triu(upper, 1) + diag(sign_s · exp(log_s))
    logdet = H · W · sum_c log_s[c]             (|det W| = prod exp(log_s): P, L have det ±1)
    x[n, :, i, j] = W⁻¹ @ y[n, :, i, j]          (inverse)

P (a permutation, stored as indices: (P M)[i] = M[perm[i]]) and sign_s are fixed buffers, kept
in ``state()``. The masks tril(·, -1) and triu(·, 1) are applied inside forward and backward,
so any values in "lower" and "upper" give a valid layer and the masked entries get zero
gradient. Initialization (seeded): a random rotation Q (QR of a Gaussian matrix), factored by
SciPy as Q = P L U; log_s = log|diag U| (summing to 0: the layer starts volume-preserving).

Backward, with M = L U (so W = P M) and dW = sum_{n,i,j} dy[n,:,i,j] x[n,:,i,j]ᵀ::

    dx     = Wᵀ dy (per pixel)
    dM     = Pᵀ dW                  (undo the row permutation)
    dlower = tril(dM Uᵀ, -1)
    dupper = triu(Lᵀ dM, 1)
    dlog_s = diag(Lᵀ dM) · sign_s · exp(log_s) + H · W · sum_n dlogdet[n]

params: "lower" (C, C), "upper" (C, C), "log_s" (C,). state: "perm" (C,) ints, "sign_s" (C,).
"""
import numpy as np
import scipy.linalg

from ..backend import default_array_module, get_array_module, to_numpy
from .base import Layer, check_gradient


class Conv1x1(Layer):
    """Invertible 1×1 convolution W = P L (U + diag(sign_s·exp(log_s))), created lazily."""

    def __init__(self, channels=None, dtype=None, seed=0):
        super().__init__()
        self._lazy_parameters(channels, dtype, seed)

    def _build(self, channels, xp, dtype):
        rng = np.random.default_rng(self.seed)
        rotation, _ = np.linalg.qr(rng.standard_normal((channels, channels)))
        p, lower, upper = scipy.linalg.lu(rotation)          # rotation = p @ lower @ upper
        s = np.diag(upper)
        self.channels = int(channels)
        self.perm = xp.asarray(np.argmax(p, axis=1))          # p[i, perm[i]] = 1
        self.sign_s = xp.asarray(np.sign(s), dtype=dtype)
        self.params = {"lower": xp.asarray(np.tril(lower, -1), dtype=dtype),
                       "upper": xp.asarray(np.triu(upper, 1), dtype=dtype),
                       "log_s": xp.asarray(np.log(np.abs(s)), dtype=dtype)}
        self.zero_grad()

    def state(self):
        return {"perm": self.perm, "sign_s": self.sign_s} if self.channels else {}

    def load_state(self, state):
        perm = to_numpy(state["perm"])
        if self.channels is None:
            self._build(len(perm), default_array_module(), self.dtype or np.float32)
        if len(perm) != self.channels:
            raise ValueError(f"state is for {len(perm)} channels, the layer has {self.channels}")
        xp = get_array_module(self.params["log_s"])
        self.perm = xp.asarray(perm)
        self.sign_s = xp.asarray(to_numpy(state["sign_s"]), dtype=self.sign_s.dtype)

    def factors(self, dtype):
        """(W, L, U) as C×C arrays of the given dtype, masks applied."""
        xp = get_array_module(self.params["log_s"])
        lower, upper, log_s = (self.params[name].astype(dtype, copy=False)
                               for name in ("lower", "upper", "log_s"))
        eye = xp.eye(self.channels, dtype=dtype)
        L = xp.tril(lower, -1) + eye
        U = xp.triu(upper, 1) + eye * (self.sign_s.astype(dtype) * xp.exp(log_s))
        return (L @ U)[self.perm], L, U

    @staticmethod
    def _mix(matrix, x):
        """matrix (C, C) applied to the channels of every pixel of x (B, C, H, W)."""
        B, C, H, W = x.shape
        return (matrix @ x.reshape(B, C, H * W)).reshape(B, matrix.shape[0], H, W)

    def forward(self, x):
        """y = W x per pixel; logdet = H·W·Σ log_s."""
        self._prepare(x, "x")
        xp = get_array_module(x)
        W_matrix, _, _ = self.factors(x.dtype)
        self._cache = x
        B, _, H, W = x.shape
        logdet = xp.full(B, H * W * self.params["log_s"].astype(x.dtype).sum(), dtype=x.dtype)
        return self._mix(W_matrix, x), logdet

    def inverse(self, y):
        """x = W⁻¹ y per pixel; W⁻¹ computed in float64 (C×C, cheap) then cast to y's dtype."""
        self._prepare(y, "y")
        W_matrix, _, _ = self.factors(np.float64)
        W_inverse = get_array_module(y).linalg.inv(W_matrix).astype(y.dtype)
        return self._mix(W_inverse, y)

    def backward(self, dy, dlogdet):
        """dx from dy (B, C, H, W) and dlogdet (B,); adds dL/dlower, dL/dupper, dL/dlog_s."""
        x = getattr(self, "_cache", None)
        check_gradient(dy, None if x is None else x.shape)
        xp = get_array_module(x)
        dy = dy.astype(x.dtype, copy=False)
        W_matrix, L, U = self.factors(x.dtype)
        dW = xp.tensordot(dy, x, axes=([0, 2, 3], [0, 2, 3]))      # (C_out, C_in)
        dM = xp.empty_like(dW)
        dM[self.perm] = dW
        dU = L.T @ dM
        log_s = self.params["log_s"].astype(x.dtype, copy=False)
        H, W = x.shape[2], x.shape[3]
        self.grads["lower"] += xp.tril(dM @ U.T, -1).astype(self.grads["lower"].dtype)
        self.grads["upper"] += xp.triu(dU, 1).astype(self.grads["upper"].dtype)
        dlog_s = xp.diagonal(dU) * self.sign_s.astype(x.dtype) * xp.exp(log_s) + H * W * dlogdet.sum()
        self.grads["log_s"] += dlog_s.astype(self.grads["log_s"].dtype)
        return self._mix(W_matrix.T, dy)
