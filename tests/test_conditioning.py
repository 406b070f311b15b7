"""The conditioning of the masked convolution's inverse (nfcore/conditioning.py): the measure
flags the weights whose inverse is wrong at a given size, the sample and memory-saving checks
raise on them and stay silent on healthy ones, and train.run logs recon_error."""
import json
import os
import warnings

import numpy as np
import pytest
import scipy.linalg

from bench.stability import draw_off_centre_taps, noisy_invconv
import nfcore
from nfcore import conditioning, reference
from nfcore.conditioning import InverseAccuracyError, amplification, inverse_gain, is_well_conditioned
from nfcore.flow import Flow
from nfcore.layers import FInCUnit
from train import run, sample


@pytest.mark.parametrize("sigma", [0.05, 0.1, 0.2])
def test_amplification_flags_the_ill_conditioned_rows(sigma):
    """InvConv(k=3, C=12), off-centre taps N(0, σ²), float32, as in bench/stability.py: σ = 0.05
    passes at every size up to 128×128; σ = 0.1 passes where its float32 error is still ~1e-5
    (16×16, 32×32) and is flagged at 128×128; σ = 0.2 is flagged from 16×16 on.
    σ = 0.1 at 64×64 sits at the limit (inverse_gain 315; amplification 456 with the
    register-blocked kernels' fused multiply-adds, 688-1150 with the earlier kernels, which
    rounded every product, or after a last-bit change of the weights): it is held within 10× of
    the limit either way, not to a side of it."""
    conv = noisy_invconv(sigma, np.float32)
    flagged = {size: not is_well_conditioned(conv, (12, size, size)) for size in (16, 32, 64, 128)}
    expected = {0.05: [], 0.1: [128], 0.2: [16, 32, 64, 128]}[sigma]
    sizes = (16, 32, 128) if sigma == 0.1 else (16, 32, 64, 128)
    assert [size for size in sizes if flagged[size]] == expected, flagged
    if sigma == 0.1:
        limit = conditioning.AMPLIFICATION_LIMIT
        assert limit / 10 < amplification(conv, (12, 64, 64)) < 10 * limit


def test_amplification_is_a_property_of_the_weights_not_the_dtype():
    """In units of each dtype's ε the same weights give about the same amplification."""
    for size in (32, 64):
        a32 = amplification(noisy_invconv(0.1, np.float32), (12, size, size))
        a64 = amplification(noisy_invconv(0.1, np.float64), (12, size, size))
        assert 0.1 < a32 / a64 < 10, (size, a32, a64)
    assert amplification(noisy_invconv(0.1, np.float64), (12, 128, 128)) > conditioning.AMPLIFICATION_LIMIT


def test_inverse_gain_against_a_dense_solve():
    """max |M⁻¹v| / max |v| from the wavefront inverse equals the one from a dense LU solve of
    the matrix written from the definition (reference.masked_conv_matrix)."""
    conv = noisy_invconv(0.3, np.float64)
    shape = (12, 6, 6)
    v = np.random.default_rng(0).standard_normal((1,) + shape)
    u = scipy.linalg.solve(reference.masked_conv_matrix(conv, 6, 6), v.ravel())
    assert inverse_gain(conv, shape) == pytest.approx(np.abs(u).max() / np.abs(v).max(), rel=1e-9)
    assert inverse_gain(conv, (12, 32, 32)) > 1e3 * inverse_gain(conv, shape)


def test_inverse_gain_of_a_layer_with_a_bias():
    """The published CInC conv adds a bias, so its inverse is M⁻¹(y − b); the gain is still that
    of M⁻¹ alone (a large bias would otherwise pass for amplification)."""
    conv = nfcore.CInCConv(k=3, channels=4, dtype=np.float64)
    rng = np.random.default_rng(1)
    conv.params["weight"][...] = rng.standard_normal(conv.params["weight"].shape) * 0.3
    conv.params["bias"][...] = 100.0
    shape = (4, 5, 6)
    v = np.random.default_rng(0).standard_normal((1,) + shape)
    u = scipy.linalg.solve(reference.masked_conv_matrix(conv, 5, 6), v.ravel())
    assert inverse_gain(conv, shape) == pytest.approx(np.abs(u).max() / np.abs(v).max(), rel=1e-9)


def noisy_flow(sigma, size=16):
    """A tiny FInC flow, ActNorm initialized, FInC units' off-centre taps N(0, σ²)."""
    flow = Flow((3, size, size), levels=2, steps=1, hidden=8, seed=0)
    x = conditioning.random_input(flow, flow.image_shape, batch=4)
    flow.forward(x)
    rng = np.random.default_rng(0)
    for layer in flow.layers:
        if isinstance(layer, FInCUnit):
            draw_off_centre_taps(layer, sigma, rng)
    return flow, x


def test_flow_amplification_at_a_larger_size_than_trained():
    """A flow built for 16×16 measured at 64×64: σ = 0.2 is fine at its own size and flagged at
    4×; σ = 0.05 passes both."""
    healthy, _ = noisy_flow(0.05)
    drifting, _ = noisy_flow(0.2)
    assert is_well_conditioned(healthy, (3, 16, 16)) and is_well_conditioned(healthy, (3, 64, 64))
    assert is_well_conditioned(drifting, (3, 16, 16))
    assert not is_well_conditioned(drifting, (3, 64, 64))


def test_sampling_checks_its_inverse():
    healthy, _ = noisy_flow(0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # silently: no warning, no exception
        checked = healthy.sample(6, 1.0, np.random.default_rng(3))
    assert healthy.last_sample_error < 1e-5
    unchecked = healthy.sample(6, 1.0, np.random.default_rng(3), tolerance=None)
    np.testing.assert_allclose(checked, unchecked, atol=1e-6)   # the probes change no sample

    # the estimate against the round trip decode(encode(x')) of a sample, where both are large
    # enough to be read above rounding. The estimate errs high: over σ = 0.25, 0.3, 0.35 and
    # sampling seeds 0-11 (36 cases) it was 1.3 to 10.0 times the round trip's error (here 4.6).
    # Below 1 the check would under-report and let wrong samples through; above 12 it would
    # refuse samples 12 times better than its tolerance says.
    mid, _ = noisy_flow(0.3)
    x = mid.sample(6, 1.0, np.random.default_rng(3), tolerance=None)
    round_trip = conditioning.round_trip_error(mid, x[:1])
    mid.sample(6, 1.0, np.random.default_rng(3), tolerance=1.0)
    assert round_trip > 1e-5 and 1.0 <= mid.last_sample_error / round_trip <= 12, \
        (mid.last_sample_error, round_trip)

    bad, _ = noisy_flow(0.5)
    with pytest.raises(InverseAccuracyError, match="estimated rounding error"):
        bad.sample(6, 1.0, np.random.default_rng(3))


def gradients(flow, x, **kwargs):
    for layer in flow.layers:
        layer.zero_grad()
    flow.loss_and_backward(x, 5, **kwargs)
    return np.concatenate([g.ravel() for layer in flow.layers for g in layer.grads.values()])


def test_memory_saving_backward_checks_its_inverse():
    healthy, x = noisy_flow(0.05)
    plain = gradients(healthy, x)
    saving = gradients(healthy, x, recompute=True)          # passes silently
    assert np.abs(saving - plain).max() < 1e-5 * np.abs(plain).max()

    bad, x = noisy_flow(0.4, size=32)
    plain = gradients(bad, x)
    unchecked = gradients(bad, x, recompute=True, inverse_tolerance=None)
    assert np.isfinite(unchecked).all()
    assert np.abs(unchecked - plain).max() > 0.1 * np.abs(plain).max()    # finite, and wrong
    with pytest.raises(InverseAccuracyError, match="rebuilt by the inverse"):
        gradients(bad, x, recompute=True)


TINY = ["--levels", "2", "--steps", "1", "--hidden", "8", "--batch-size", "32"]


def test_train_logs_recon_error_and_can_stop_on_it(tmp_path, capsys):
    out = str(tmp_path / "run")
    final = run.main(TINY + ["--max-steps", "4", "--eval-every", "2", "--sample-every", "1000",
                             "--out", out])
    with open(os.path.join(out, "metrics.jsonl")) as file:
        records = [json.loads(line) for line in file]
    errors = [r["recon_error"] for r in records if "test_bpd" in r]
    assert len(errors) == 2 and all(0 < e < 1e-4 for e in errors), errors
    assert final["recon_error"] == errors[-1]
    printed = capsys.readouterr()
    assert "step 2: test bpd" in printed.out + printed.err and "recon error" in printed.out + printed.err

    sample.main(["--ckpt", os.path.join(out, "checkpoint.h5"), "--n", "4",
                 "--out", str(tmp_path / "s.png")])
    assert "inverse check: estimated rounding error" in capsys.readouterr().out

    with pytest.raises(SystemExit):
        run.main(TINY + ["--max-steps", "4", "--eval-every", "2", "--out", str(tmp_path / "stop"),
                         "--recon-threshold", "1e-12", "--stop-on-recon-error"])
    printed = capsys.readouterr()
    assert "warning: recon_error" in printed.out + printed.err
    assert "error: stopping at step 2 (--stop-on-recon-error)" in printed.err


def test_guard_bounds_the_gain_and_leaves_healthy_layers_alone():
    healthy, _ = noisy_flow(0.05)
    before = [layer.params["weight"].copy() for layer, _ in conditioning.masked_convs_with_sizes(healthy)]
    assert conditioning.guard_conditioning(healthy, scale=4) == 0
    for (layer, _), weight in zip(conditioning.masked_convs_with_sizes(healthy), before):
        np.testing.assert_array_equal(layer.params["weight"], weight)

    drifting, _ = noisy_flow(0.2)
    convs = conditioning.masked_convs_with_sizes(drifting)
    assert [shape for _, shape in convs] == [(12, 8, 8), (24, 4, 4)]
    self_taps = [layer.params["weight"][..., 2, 2].copy() for layer, _ in convs]
    assert not is_well_conditioned(drifting, (3, 64, 64))
    assert conditioning.guard_conditioning(drifting, scale=4) == 2
    for (layer, (C, H, W)), self_tap in zip(convs, self_taps):
        assert inverse_gain(layer, (C, 4 * H, 4 * W)) <= conditioning.GUARD_GAIN
        np.testing.assert_array_equal(layer.params["weight"][..., 2, 2], self_tap)
    assert is_well_conditioned(drifting, (3, 64, 64))


class FakeGpuArray(np.ndarray):
    """A NumPy array the backend takes for a CuPy array (its type lives in a 'cupy' module);
    ``get`` brings it to the host, as CuPy's does."""

    def get(self):
        return self.view(np.ndarray).copy()


FakeGpuArray.__module__ = "cupy._core.core"


def fake_cupy(monkeypatch):
    """A stand-in CuPy module (NumPy's functions, their arrays returned as FakeGpuArray) and
    the CPU kernels for its arrays: layers with FakeGpuArray weights run as on a GPU, with
    nfcore's device checks in force."""
    import sys
    import types
    from nfcore import kernels
    from nfcore.kernels import cpu

    def attribute(name):
        value = getattr(np, name)
        if not callable(value) or isinstance(value, type):
            return value

        def call(*args, **kwargs):
            result = value(*args, **kwargs)
            return result.view(FakeGpuArray) if isinstance(result, np.ndarray) else result
        return call

    module = types.ModuleType("cupy")
    module.__getattr__ = attribute
    module.ndarray = FakeGpuArray
    monkeypatch.setitem(sys.modules, "cupy", module)
    monkeypatch.setattr(kernels, "for_array", lambda x: cpu)
    return module


def test_guard_probes_where_the_weights_live(monkeypatch):
    """With the masked convolutions' weights on the (faked) GPU, the guard's probe is made
    there too: a NumPy probe was refused by the layer's device check (TypeError, what
    train.run --backend gpu --guard 4 ended in), and the rescaled weights stay on the device."""
    fake_cupy(monkeypatch)
    drifting, _ = noisy_flow(0.2)
    convs = conditioning.masked_convs_with_sizes(drifting)
    for layer, _ in convs:
        for name in layer.params:
            layer.params[name] = layer.params[name].view(FakeGpuArray)
    assert conditioning.guard_conditioning(drifting, scale=4) == 2
    for layer, (C, H, W) in convs:
        assert type(layer.params["weight"]) is FakeGpuArray
        assert inverse_gain(layer, (C, 4 * H, 4 * W)) <= conditioning.GUARD_GAIN


def test_guard_names_the_layers_it_gives_up_on():
    """A self-tap with a large triangle amplifies by itself (its inverse solves each pixel's
    channels in turn): no shrinking of the off-centre taps brings the gain within bounds; the
    guard stops after its rounds and says which layer it gave up on."""
    flow, _ = noisy_flow(0.05)
    layer, (C, H, W) = conditioning.masked_convs_with_sizes(flow)[1]
    weight = layer.params["weight"]                      # (groups, C/4, C/4, k, k)
    weight[..., 2, 2] = np.tril(np.full(weight.shape[1:3], 3.0), -1)
    gave_up = []
    assert conditioning.guard_conditioning(flow, scale=4, rounds=3, gave_up=gave_up) == 1
    assert gave_up == [f"masked convolution 1 (FInCUnit, {C} channels): inverse gain "
                       f"{inverse_gain(layer, (C, 4 * H, 4 * W)):.3g} > 10 at {4 * H}x{4 * W} "
                       f"after 3 rescales"]


GUARDED = TINY + ["--eval-every", "1000", "--sample-every", "1000"]


def drifted_run(out, *options):
    """A 10-step run with --ema 0.99 (and ``options``) whose masked convolutions' off-centre
    taps, trained and averaged alike, were then redrawn N(0, 0.5²) in its checkpoint: inverse
    gains at 4× the size from ~1e2 to ~2e5 (what bench/guard.py calls a drifted start)."""
    import h5py
    from train.session import load_flow
    run.main(GUARDED + ["--max-steps", "10", "--ema", "0.99", "--out", out, *options])
    path = os.path.join(out, "checkpoint.h5")
    flow, _, _ = load_flow(path)
    rng = np.random.default_rng(0)
    with h5py.File(path, "r+") as file:
        for layer, _ in conditioning.masked_convs_with_sizes(flow):
            for prefix in ("model", "optim/ema"):
                weight = file[f"{prefix}/{flow.layers.index(layer)}/weight"]
                drifted = weight[()]
                self_tap = drifted[..., 2, 2].copy()
                drifted[...] = rng.standard_normal(drifted.shape) * 0.5
                drifted[..., 2, 2] = self_tap
                weight[...] = drifted
    assert min(gains(out, "raw") + gains(out, "ema")) > 100
    return out


def gains(out, weights):
    """inverse_gain at 4× of every masked convolution of ``out``'s checkpoint, with ``weights``."""
    from train.session import load_flow
    flow, _, _ = load_flow(os.path.join(out, "checkpoint.h5"), weights=weights)
    return [inverse_gain(layer, (C, 4 * H, 4 * W))
            for layer, (C, H, W) in conditioning.masked_convs_with_sizes(flow)]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as file:
        return [json.loads(line) for line in file]


def test_train_guard_bounds_the_trained_and_the_averaged_weights(tmp_path):
    """--guard 4 from a drifted start: at step 20 the training loop's guard rescales both
    masked convolutions in the trained weights and in the EMA that evaluation and sampling
    use; the checkpoint written right after has every gain within GUARD_GAIN in both."""
    out = drifted_run(str(tmp_path / "guarded"))
    run.main(GUARDED + ["--max-steps", "20", "--guard", "4", "--resume", "--out", out])
    assert [r for r in metrics(out) if "guard_rescaled" in r or "guard_rescaled_ema" in r] == \
        [{"step": 20, "guard_rescaled": 2, "guard_rescaled_ema": 2}]
    assert max(gains(out, "raw")) <= conditioning.GUARD_GAIN
    assert max(gains(out, "ema")) <= conditioning.GUARD_GAIN
    with open(os.path.join(out, "config.json")) as file:
        assert json.load(file)["guard"] == 4


def test_train_guard_warns_once_when_it_gives_up(tmp_path, capsys, monkeypatch):
    """Two rounds of 0.9 cannot undo the drift: one warning line at step 20, and every call
    that gives up logged in metrics.jsonl; training goes on."""
    monkeypatch.setattr(conditioning, "GUARD_ROUNDS", 2)
    out = drifted_run(str(tmp_path / "gives_up"))
    capsys.readouterr()
    run.main(GUARDED + ["--max-steps", "30", "--guard", "4", "--resume", "--out", out])
    printed = capsys.readouterr()
    warnings_said = [line for line in (printed.out + printed.err).splitlines()
                     if "--guard gave up" in line]
    assert len(warnings_said) == 1 and warnings_said[0].startswith(
        "warning: step 20: --guard gave up on 4 layer(s) (masked convolution 0 (FInCUnit, 4 "
        "channels): inverse gain "), warnings_said
    gave_up = [r for r in metrics(out) if "guard_gave_up" in r]
    assert [r["step"] for r in gave_up] == [20, 30]
    assert gave_up[0]["guard_gave_up"].count("after 2 rescales") == 4
    assert gave_up[0]["guard_gave_up"].count("EMA weights, masked convolution") == 2


def test_train_guard_turned_off_on_resume(tmp_path, capsys):
    """--guard 0 on --resume turns a guarded run's guard off, said and recorded like the other
    training options; the drifted weights are then left as they are."""
    out = drifted_run(str(tmp_path / "off"), "--guard", "4")
    drifted = gains(out, "raw")
    capsys.readouterr()
    run.main(GUARDED + ["--max-steps", "20", "--guard", "0", "--resume", "--out", out])
    assert "resumed with changed training options: --max-steps 10 -> 20, --guard 4 -> off" \
        in capsys.readouterr().out
    with open(os.path.join(out, "config.json")) as file:
        assert json.load(file)["guard"] is None
    records = metrics(out)
    assert [r["resumed_with"]["guard"] for r in records if "resumed_with" in r] == [None]
    assert not any("guard_rescaled" in r for r in records)
    np.testing.assert_allclose(gains(out, "raw"), drifted, rtol=0.5)     # not brought to <= 10
    assert min(gains(out, "raw")) > 100


def test_scale_bound_keeps_a_collapsed_coupling_invertible():
    """The couplings' inverse divides by s: a network output driven far negative (what enlarged
    or tiled digits do to the digits model, log s ≈ −40) multiplies the rounding errors of the
    layers above by 1/s, and decode(encode(x)) comes back wrong. The same weights with
    scale_bound 2 keep 1/s ≤ e² and the round trip at float32's level."""
    from nfcore.layers import AffineCoupling
    errors = {}
    for bound in (None, 2.0):
        flow = Flow((3, 16, 16), levels=2, steps=2, hidden=8, seed=0, scale_bound=bound)
        x = conditioning.random_input(flow, flow.image_shape, batch=4)
        flow.forward(x)
        rng = np.random.default_rng(1)
        for layer in flow.layers:
            if isinstance(layer, AffineCoupling):
                last = layer.parts["nn"].parts["conv3"].params
                last["weight"][...] = rng.standard_normal(last["weight"].shape) * 0.1
                last["bias"][len(last["bias"]) // 2:] = -40.0             # raw ≈ −40: s ≈ 1e-18
        errors[bound] = conditioning.round_trip_error(flow, x)
    assert errors[None] > 1e-2 and errors[2.0] < 1e-5, errors


def test_train_scale_bound_option(tmp_path, capsys):
    from train.session import build_flow, load_flow
    out = str(tmp_path / "bounded")
    run.main(["--levels", "2", "--steps", "1", "--hidden", "8", "--batch-size", "32", "--max-steps", "3",
              "--eval-every", "1000", "--sample-every", "1000", "--scale-bound", "2", "--out", out])
    with open(os.path.join(out, "config.json")) as file:
        config = json.load(file)
    assert config["scale_bound"] == 2.0
    flow, _, _ = load_flow(os.path.join(out, "checkpoint.h5"))
    assert {layer.scale_bound for layer in flow.layers if hasattr(layer, "scale_bound")} == {2.0}
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run.main(["--scale-bound", "3", "--out", out, "--resume", "--max-steps", "4"])
    assert "trained with --scale-bound 2.0, not 3.0" in capsys.readouterr().err
    del config["scale_bound"]                      # a checkpoint from before the option: unbounded
    assert {layer.scale_bound for layer in build_flow(config).layers if hasattr(layer, "scale_bound")} == {None}
