"""CInCConv: the k×k invertible convolution of CInC Flow, as its official code defines it.

Shapes: x, y (B, C, H, W). Weight W (C, C, k, k), W[co, ci, a, b]; log_diag s (C,); bias b (C,).

The published layer (``invertible_conv2D`` in the CInC Flow code, a fork of the Emerging code)
is one top-left padded k×k convolution whose self-tap block is upper triangular, plus a bias::

    y[n, co, i, j] = sum_{ci, a, b} W_eff[co, ci, a, b] * x[n, ci, i-(k-1)+a, j-(k-1)+b] + b[co]
    W_eff[co, ci, k-1, k-1] = 0 for ci < co,  exp(s_co) for ci = co     (output co reads ci >= co)
    logdet = H * W * sum_c s_c

(The official code writes it as a (2k-1)×(2k-1) kernel masked with Emerging's square mask
flipped on all four axes; the nonzero part is this k×k kernel.) It is ``InvConv`` (invconv.py)
with ``self_tap="upper"``, a bias and the published initialisation: every weight N(0, 0.02²),
the self-tap's diagonal 1 + N(0, 0.02²).

The orientation matters in a ``cinc`` flow step (ActNorm → CInCConv → coupling, no 1×1 conv):
the coupling passes the first half of the channels through, and only an upper self-tap lets the
first channel of a pixel depend on the last channel of that same pixel.

One deliberate difference: the official diagonal is a free-sign d with logdet H·W·Σ log|d|; here
it is exp(s), positive. Starting from d ≈ 1, the log-barrier of log|d| keeps d's sign anyway,
so the two parameterise the same functions along a training run.

The inverse is ``InvConv.inverse``: the wavefront solve by default; ``method="raster"`` is the
published pixel-by-pixel solve (``inverse_op_cython.pyx``), kept for the sampling benchmark.
"""
from .invconv import InvConv

PUBLISHED_INIT_STD = 0.02   # the published weights: N(0, 0.02²), plus 1 on the self-tap's diagonal


class CInCConv(InvConv):
    """The published CInC conv: top-left k×k, upper-triangular self-tap with a learned
    diagonal, a per-channel bias, the published initialisation.

    params: "weight" (C, C, k, k), "log_diag" (C,), "bias" (C,).
    """

    def __init__(self, k=3, channels=None, dtype=None, seed=0):
        super().__init__(k, channels, "top-left", learn_diag=True, dtype=dtype, seed=seed,
                         self_tap="upper", bias=True, init_std=PUBLISHED_INIT_STD)
