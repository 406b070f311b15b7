"""The PyTorch twin (bench/twin.py) computes what nfcore computes: log p per sample, every
latent, every parameter gradient of the mean bits/dim and decode, to 1e-10 in float64, for every
step kind with both couplings. Skipped without torch (pip install -e .[bench])."""
import pytest

import nfcore  # noqa: F401  (before torch: the process's OpenMP runtime is nfcore's, nfcore/threads.py)

pytest.importorskip("torch")

from bench import twin  # noqa: E402  (after the skip: bench.twin imports torch)
from nfcore.flow import COUPLINGS, STEP_KINDS  # noqa: E402


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("invconv", STEP_KINDS)
def test_twin_agrees_with_nfcore_in_float64(invconv, coupling):
    errors, worst = twin.agreement(invconv, coupling, "float64")
    tolerance = twin.TOLERANCE[twin.np.dtype("float64")]
    assert max(errors.values()) <= tolerance, (errors, f"worst gradient: {worst}")


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_twin_agrees_with_a_bounded_coupling_scale(coupling):
    """scale_bound 0.1: log sigmoid(raw + 2) ≈ −0.13 already passes the bound, so the tanh
    squash and its slope in the hand-written backward are exercised against autograd."""
    errors, worst = twin.agreement("finc", coupling, "float64", scale_bound=0.1)
    assert max(errors.values()) <= twin.TOLERANCE[twin.np.dtype("float64")], (errors, worst)


def test_twin_refuses_an_uninitialized_flow():
    flow = twin.Flow((3, 8, 8), levels=1, steps=1, hidden=4, invconv="glow1x1")
    with pytest.raises(ValueError, match="not initialized"):
        twin.from_nfcore(flow)
