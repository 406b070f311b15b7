"""Checks whose cost matters on a GPU, tested on the CPU.

- NaN/Inf: a layer on its own refuses them, but inside Flow the layers defer the test and the
  flow checks once per call (on a GPU each check waits for the device: once per layer stalls
  it at every layer). Counted here by wrapping ``check_finite``, the one function that brings
  finiteness flags to the host.
- A layer whose parameters live on one device refuses an input from the other with one clear
  line (a stand-in class plays the CuPy array: its type's module is named "cupy...").
"""
import numpy as np
import pytest

import nfcore
from nfcore.flow import STEP_KINDS, Flow
from nfcore.layers import NonFiniteError, actnorm, base
from nfcore import flow as flow_module
from nfcore.optim import Adam


def small_flow(invconv="finc", dtype=np.float64):
    return Flow((2, 8, 8), levels=2, steps=2, hidden=4, invconv=invconv, coupling="affine", k=3,
                seed=0, dtype=dtype)


def images(n=3, seed=0):
    return np.random.default_rng(seed).uniform(-0.5, 0.5, (n, 2, 8, 8))


@pytest.fixture
def finite_checks(monkeypatch):
    """A list that gets the names passed to every check_finite call from now on."""
    calls = []
    real = base.check_finite

    def counting(arrays, fetch=None):
        calls.append(tuple(arrays))
        return real(arrays, fetch)

    for module in (base, flow_module, actnorm):
        monkeypatch.setattr(module, "check_finite", counting)
    return calls


@pytest.mark.parametrize("invconv", STEP_KINDS)
def test_one_finiteness_check_per_training_step(invconv, finite_checks):
    flow = small_flow(invconv)
    x = images()
    flow.forward(x)                                  # ActNorm's initialization
    optimizer = Adam(flow.layers, lr=1e-3, max_grad_norm=50.0)
    for recompute in (False, True):
        finite_checks.clear()
        optimizer.zero_grad()
        loss, bpd = flow.loss_and_backward(x, 8, recompute=recompute)
        optimizer.step()
        assert finite_checks == [("x", "the loss (bits/dim)")]
        assert loss == float(bpd.mean())           # fetched in the same transfer


def test_one_finiteness_check_per_call_of_forward_encode_decode_and_sample(finite_checks):
    flow = small_flow("emerging")
    x = images()
    flow.forward(x)
    finite_checks.clear()
    flow.forward(x)
    latents = flow.encode(x)
    flow.decode(latents)
    flow.sample(4, 0.7, np.random.default_rng(0))
    flow.bits_per_dim(x, 8)
    flow.log_prob(x)
    assert finite_checks == [("x", "z_top", "logdet"), ("x", "latent 0", "latent 1"),
                             ("z_top", "latent 0", "x"), ("z_top", "x"), ("x", "bits/dim"),
                             ("x", "log p(x)")]


def test_a_layer_on_its_own_still_refuses_nan(finite_checks):
    conv = nfcore.InvConv(k=3, channels=2, dtype="float64")
    x = images()
    x[1, 0, 2, 3] = np.nan
    with pytest.raises(NonFiniteError, match="^x contains NaN or Inf$"):
        conv.forward(x)
    with pytest.raises(NonFiniteError, match="^y contains NaN or Inf$"):
        conv.inverse(x)
    assert finite_checks == [("x",), ("y",)]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_flow_refuses_nan_input_before_touching_gradients_or_actnorm(bad):
    flow = small_flow()
    x = images()
    x[0, 1, 4, 4] = bad
    with pytest.raises(NonFiniteError, match="^x contains NaN or Inf$"):
        flow.forward(x)                  # the first batch would initialize the ActNorms
    assert not any(layer.initialized for layer in flow.layers if isinstance(layer, nfcore.ActNorm))
    flow.forward(images(seed=1))
    for layer in flow.layers:
        layer.zero_grad()
    with pytest.raises(NonFiniteError, match="^x contains NaN or Inf$"):
        flow.loss_and_backward(x, 8)
    assert all(not g.any() for layer in flow.layers for g in layer.grads.values())
    with pytest.raises(NonFiniteError, match="^x contains NaN or Inf$"):
        flow.log_prob(x)
    latents = flow.encode(images())
    latents[0][0, 0, 0, 0] = bad
    with pytest.raises(NonFiniteError, match="^latent 0 contains NaN or Inf$"):
        flow.decode(latents)


def test_an_overflow_inside_the_flow_is_named_as_the_loss(monkeypatch):
    flow = small_flow()
    x = images()
    flow.forward(x)
    middle = flow.layers[4]
    real_forward = middle.forward
    monkeypatch.setattr(middle, "forward", lambda h: (lambda y, ld: (y * np.inf, ld))(*real_forward(h)))
    with pytest.raises(NonFiniteError, match="^the loss \\(bits/dim\\) contains NaN or Inf$"):
        flow.loss_and_backward(x, 8)


class FakeCupyArray:
    """Looks like a 4-D float32 CuPy array to the checks (its type lives in a 'cupy' module)."""
    __module__ = "cupy._core.core"

    def __init__(self, shape, dtype=np.float32):
        self.shape, self.ndim, self.dtype = tuple(shape), len(shape), np.dtype(dtype)


LAYERS = {
    "InvConv": lambda: nfcore.InvConv(k=3, channels=4),
    "FInCUnit": lambda: nfcore.FInCUnit(k=3, channels=4),
    "EmergingConv": lambda: nfcore.EmergingConv(k=3, channels=4),
    "ActNorm": lambda: nfcore.ActNorm(4),
    "Conv1x1": lambda: nfcore.Conv1x1(4),
    "AffineCoupling": lambda: nfcore.AffineCoupling(channels=4, hidden=4),
    "QuadCoupling": lambda: nfcore.QuadCoupling(channels=4, hidden=4),
    "Split": lambda: nfcore.Split(channels=4),
}


@pytest.mark.parametrize("name", LAYERS)
def test_numpy_weights_with_a_cupy_input_is_one_clear_error(name):
    layer = LAYERS[name]()
    if isinstance(layer, nfcore.ActNorm):
        layer.load_state({"initialized": True})
    message = "is a CuPy \\(GPU\\) array but the layer's parameter '.*' is a NumPy \\(CPU\\) array"
    x = FakeCupyArray((2, 4, 8, 8))
    with pytest.raises(TypeError, match="^x " + message):
        layer.forward(x)
    with pytest.raises(TypeError, match="^(y|z1) " + message):
        layer.inverse(FakeCupyArray((2, 2, 8, 8)) if name == "Split" else x)


def test_cupy_weights_with_a_numpy_input_is_one_clear_error():
    layer = nfcore.Conv1x1(4)
    layer.params["log_s"] = FakeCupyArray((4,))
    with pytest.raises(TypeError, match="^x is a NumPy \\(CPU\\) array but the layer's parameter "
                                        "'log_s' is a CuPy \\(GPU\\) array: build the layer after "
                                        "nfcore.set_backend\\(\"cpu\"\\)"):
        layer.forward(np.zeros((2, 4, 8, 8), np.float32))


def test_a_deferral_in_one_thread_leaves_the_checks_of_the_others_on():
    """finite_checks_deferred is per thread: while one thread is inside it, another thread's
    layer still refuses NaN (a module-wide flag would switch the check off everywhere)."""
    import threading

    bad = np.full((1, 2, 4, 4), np.nan)
    inside, done, seen = threading.Event(), threading.Event(), {}

    def deferring():
        with base.finite_checks_deferred():
            base.check_images(bad, "x")                   # deferred here: no error
            inside.set()
            done.wait(10)

    def checking():
        inside.wait(10)
        try:
            base.check_images(bad, "x")
        except NonFiniteError as error:
            seen["error"] = error
        finally:
            done.set()

    threads = [threading.Thread(target=deferring), threading.Thread(target=checking)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert "x contains NaN or Inf" in str(seen.get("error"))
    with pytest.raises(NonFiniteError):                   # and none is left deferred here
        base.check_images(bad, "x")
