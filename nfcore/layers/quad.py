"""QuadCoupling: CInC Flow's four-block coupling.

Shapes: x, y (B, C, H, W), C >= 4. Blocks z1..z4 of x's channels, as equal as possible with the
earlier ones never larger: block k holds channels floor((k-1)·C/4) .. floor(k·C/4) - 1
(C = 4: 1,1,1,1; C = 6: 1,2,1,2; C = 12: 3,3,3,3)::

    y1 = z1
    y2 = (z2 + t1) · s1        (t1, raw1) = f1(z1)
    y3 = (z3 + t2) · s2        (t2, raw2) = f2([z1, z2])
    y4 = (z4 + t3) · s3        (t3, raw3) = f3([z1, z2, z3])
    s_k = sigmoid(raw_k + 2),  logdet = Σ log s1 + Σ log s2 + Σ log s3

Every f_k is a coupling Network (nfcore.nn.Network) and reads the *input* blocks z, not the
outputs y. The Jacobian is block lower-triangular with diagonal blocks I, diag(s1), diag(s2),
diag(s3), hence the logdet. The inverse, derived from this forward pass, solves the blocks in
order, each network fed with blocks already recovered::

    x1 = y1
    x2 = y2 / s1 - t1          with f1(x1)           (= f1(z1))
    x3 = y3 / s2 - t2          with f2([x1, x2])     (= f2([z1, z2]))
    x4 = y4 / s3 - t3          with f3([x1, x2, x3])

(docs/design.md notes that the published code's inverse reads a wrong block; this one is derived
from the forward above, and the tests check inverse(forward(x)) = x to 1e-10.)

The implementation is coupling.BlockCoupling with four blocks, the same code as AffineCoupling
(its two-block case), including the backward with the logdet's gradient.
params: "f1.conv1.weight", ..., "f3.conv3.logs" (see nfcore.nn.Network).
"""
from .coupling import BlockCoupling


class QuadCoupling(BlockCoupling):
    """Four-block coupling: y_{k+1} = (z_{k+1} + t_k) · sigmoid(raw_k + 2), f_k([z_1..z_k])."""

    def __init__(self, channels=None, hidden=512, actnorm=False, dtype=None, seed=0, scale_bound=None):
        super().__init__(("f1", "f2", "f3"), channels, hidden, actnorm, dtype, seed, scale_bound)
