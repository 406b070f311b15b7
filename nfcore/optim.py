"""Adam (Kingma & Ba 2015), written out, with learning-rate warm-up, gradient clipping and an
exponential moving average (EMA, Polyak averaging) of the parameters.

The optimizer works on layers as the layer contract defines them: each has ``params`` (name →
array) and ``grads`` (same names and shapes). At step t (counted from 1), for every parameter
θ with gradient g::

    g   ← g · min(1, max_grad_norm / ‖G‖)          ‖G‖: the norm of all gradients together
    m   ← β1 · m + (1 − β1) · g                     first moment
    v   ← β2 · v + (1 − β2) · g²                    second moment
    lr_t = lr · min(1, t / warmup_steps)            linear warm-up (lr_t = lr without it)
    θ   ← θ − lr_t · (m / (1 − β1^t)) / (sqrt(v / (1 − β2^t)) + ε)
    ema ← d · ema + (1 − d) · θ                     with d = ema_decay

Every update is in place, so a layer's arrays stay the same objects. The EMA starts as a copy
of the parameters after the first step (after any data-dependent initialization such as
ActNorm's has run). Arrays may be NumPy or CuPy; each update uses the array module of its
parameter. A NumPy parameter is updated by one Numba pass (``adam_update_numba``: the five
lines above per entry, in float64 arithmetic for a float32 parameter) instead of NumPy's dozen
passes and temporaries; ``adam_update_numpy`` is its reference (the same formula, the CuPy
path), identical in float64. The sum of squares of the norm is one pass too.
"""
import contextlib
import math

import numpy as np
from numba import njit

from .backend import get_array_module, is_cupy_array, to_numpy


@njit(cache=True)
def adam_update_numba(param, grad, m, v, clip, lr_t, beta1, beta2, correction1, correction2, eps):
    """One Adam update of flat, contiguous NumPy arrays, in place, entry by entry."""
    for i in range(param.size):
        g = grad[i] * clip
        m[i] = m[i] * beta1 + (1.0 - beta1) * g
        v[i] = v[i] * beta2 + (1.0 - beta2) * g * g
        param[i] -= lr_t * (m[i] / correction1) / (np.sqrt(v[i] / correction2) + eps)


def adam_update_numpy(xp, param, grad, m, v, clip, lr_t, beta1, beta2, correction1, correction2,
                      eps):
    """The same update with whole-array operations (NumPy or CuPy), in place."""
    g = grad * clip if clip != 1.0 else grad
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    v += (1.0 - beta2) * g * g
    param -= lr_t * (m / correction1) / (xp.sqrt(v / correction2) + eps)


@njit(cache=True)
def _sum_of_squares(values):
    """Σ values², accumulated in float64."""
    total = 0.0
    for value in values:
        total += np.float64(value) * np.float64(value)
    return total


def _fused(*arrays):
    return not any(is_cupy_array(a) for a in arrays) and all(a.flags.c_contiguous for a in arrays)


class Adam:
    """Adam over a list of layers (objects with ``params`` and ``grads`` dicts)."""

    def __init__(self, layers, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, warmup_steps=0,
                 max_grad_norm=None, ema_decay=None):
        layers = list(layers)
        for index, layer in enumerate(layers):
            if not isinstance(getattr(layer, "params", None), dict) or \
                    not isinstance(getattr(layer, "grads", None), dict):
                raise TypeError(f"layer {index} ({type(layer).__name__}) needs dicts "
                                f"'params' and 'grads'")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
        if ema_decay is not None and not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1) or be None, got {ema_decay}")
        self.layers = layers
        self.lr, self.betas, self.eps = lr, tuple(betas), eps
        self.warmup_steps, self.max_grad_norm, self.ema_decay = warmup_steps, max_grad_norm, ema_decay
        self.step_count = 0
        self.m, self.v = {}, {}
        self._make_moments()
        self.ema = None  # name → array, from the first step on (when ema_decay is set)

    def _make_moments(self):
        """Zero first and second moments for every parameter that has none yet: a layer that
        builds its parameters on first use (``InvConv(k=3)``) gets them at the first step."""
        for key, param in self._named_params():
            if key not in self.m:
                self.m[key] = get_array_module(param).zeros_like(param)
                self.v[key] = get_array_module(param).zeros_like(param)

    def _named_params(self):
        """(key, array) for every parameter; key = "<layer index>/<param name>"."""
        for index, layer in enumerate(self.layers):
            for name, param in layer.params.items():
                yield f"{index}/{name}", param

    def _named_grads(self):
        for index, layer in enumerate(self.layers):
            grads = layer.grads           # a composite's view, built once per layer
            for name, param in layer.params.items():
                grad = grads.get(name)
                if grad is None or grad.shape != param.shape:
                    raise ValueError(
                        f"layer {index} ({type(layer).__name__}): grads[{name!r}] is "
                        f"{'missing' if grad is None else f'of shape {grad.shape}'}, expected "
                        f"shape {param.shape}")
                yield f"{index}/{name}", grad

    def learning_rate(self, step=None):
        """lr_t for step ``step`` (default: the next step), warm-up included."""
        step = self.step_count + 1 if step is None else step
        if self.warmup_steps == 0:
            return self.lr
        return self.lr * min(1.0, step / self.warmup_steps)

    def grad_norm(self):
        """The global L2 norm of all gradients together, as a Python float.

        The squares are summed on the gradients' device, in float64, and brought to the host
        once (one device→host wait per step on a GPU, not one per parameter)."""
        squares = [_sum_of_squares(g.reshape(-1)) if _fused(g)
                   else get_array_module(g).sum(g.astype(np.float64) ** 2)
                   for _, g in self._named_grads()]
        if not squares:
            return 0.0
        if all(isinstance(square, float) for square in squares):
            return math.sqrt(math.fsum(squares))
        xp = get_array_module(squares[-1])
        return math.sqrt(float(xp.stack([xp.asarray(square) for square in squares]).sum()))

    def step(self):
        """One Adam update of every parameter, in place. Returns the pre-clip gradient norm.

        Raises FloatingPointError (and changes nothing) when the gradients hold NaN or Inf.
        """
        norm = self.grad_norm()
        if not math.isfinite(norm):
            raise FloatingPointError(f"gradient norm is {norm} at step {self.step_count + 1}: "
                                     f"no update made")
        self._make_moments()
        clip = 1.0
        if self.max_grad_norm is not None and norm > self.max_grad_norm:
            clip = self.max_grad_norm / norm
        self.step_count += 1
        t = self.step_count
        beta1, beta2 = self.betas
        lr_t = self.learning_rate(t)
        correction1, correction2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
        grads = dict(self._named_grads())
        for key, param in self._named_params():
            grad, m, v = grads[key], self.m[key], self.v[key]
            if _fused(param, grad, m, v) and grad.dtype == param.dtype:
                adam_update_numba(param.reshape(-1), grad.reshape(-1), m.reshape(-1),
                                  v.reshape(-1), clip, lr_t, beta1, beta2, correction1,
                                  correction2, self.eps)
            else:
                adam_update_numpy(get_array_module(param), param, grad, m, v, clip, lr_t, beta1,
                                  beta2, correction1, correction2, self.eps)
        self._update_ema()
        return norm

    def _update_ema(self):
        if self.ema_decay is None:
            return
        if self.ema is None:
            self.ema = {}
        for key, param in self._named_params():
            if key not in self.ema:                  # the first step, or a parameter just built
                self.ema[key] = param.copy()
                continue
            average = self.ema[key]
            average *= self.ema_decay
            average += (1.0 - self.ema_decay) * param

    def zero_grad(self):
        """Set every gradient to zero in place (creating any that is missing)."""
        for layer in self.layers:
            grads = layer.grads
            for name, param in layer.params.items():
                grad = grads.get(name)
                if grad is None or grad.shape != param.shape:
                    layer.grads[name] = get_array_module(param).zeros_like(param)
                else:
                    grad.fill(0)

    def swap_ema(self):
        """Exchange the parameters and their EMA in place; calling it again swaps back.

        A no-op before the first step, when the average is the parameters themselves.
        """
        if self.ema_decay is None:
            raise ValueError("swap_ema needs an EMA: build the optimizer with ema_decay")
        if self.ema is None:
            return
        for key, param in self._named_params():
            kept = param.copy()
            param[...] = self.ema[key]
            self.ema[key][...] = kept

    @contextlib.contextmanager
    def ema_parameters(self):
        """``with opt.ema_parameters():`` evaluate or sample with the averaged parameters
        (with the parameters themselves when the optimizer keeps no EMA)."""
        if self.ema_decay is None:
            yield
            return
        self.swap_ema()
        try:
            yield
        finally:
            self.swap_ema()

    def state_dict(self):
        """{"step": int, "m/<key>": array, "v/<key>": array, "ema/<key>": array} in NumPy."""
        state = {"step": self.step_count}
        for prefix, arrays in (("m", self.m), ("v", self.v), ("ema", self.ema or {})):
            for key, array in arrays.items():
                state[f"{prefix}/{key}"] = to_numpy(array).copy()
        return state

    def load_state_dict(self, state):
        """Restore what ``state_dict`` returned, into the existing arrays (NumPy or CuPy)."""
        if "step" not in state:
            raise ValueError("optimizer state has no 'step'")
        has_ema = any(name.startswith("ema/") for name in state)
        if has_ema and self.ema_decay is None:
            raise ValueError("optimizer state holds an EMA but this optimizer has no ema_decay")
        expected = ["m", "v"] + (["ema"] if has_ema else [])
        known = {f"{prefix}/{key}" for prefix in expected for key, _ in self._named_params()}
        unknown = sorted(set(state) - known - {"step"})
        if unknown:
            raise ValueError(f"optimizer state has entries no parameter matches: {unknown[:5]}")
        for prefix in expected:
            for key, param in self._named_params():
                name = f"{prefix}/{key}"
                if name not in state:
                    raise ValueError(f"optimizer state is missing {name!r}")
                if tuple(state[name].shape) != tuple(param.shape):
                    raise ValueError(f"optimizer state {name!r} has shape "
                                     f"{tuple(state[name].shape)}, expected {tuple(param.shape)}")
        self.step_count = int(state["step"])
        self._make_moments()
        for key, param in self._named_params():
            xp = get_array_module(param)
            self.m[key][...] = xp.asarray(state[f"m/{key}"])
            self.v[key][...] = xp.asarray(state[f"v/{key}"])
        if has_ema:
            self.ema = {key: get_array_module(param).array(state[f"ema/{key}"], dtype=param.dtype)
                        for key, param in self._named_params()}
        else:
            self.ema = None
