"""What every invertible layer shares: parameters, gradients, and checks on its input.

The layer contract (docs/design.md)::

    y, logdet = layer.forward(x)     # x: (B, C, H, W); logdet: (B,), log|det dy/dx| per sample
    x = layer.inverse(y)             # exact inverse, up to float rounding
    dx = layer.backward(dy, dlogdet) # uses what forward cached; adds into layer.grads

``params`` maps a name to an array; ``grads`` has the same keys and shapes and is accumulated
with ``+=`` by ``backward`` and zeroed by the optimizer (``zero_grad``).

NaN and Inf. A layer called on its own refuses non-finite input (``check_images``). Testing
finiteness means bringing a flag from the device to the host, which on a GPU waits for all the
work queued before it; once per layer, that stalls the GPU at every layer. So ``Flow`` runs its
layers inside ``finite_checks_deferred()``, where the layers skip that test, and checks once
per call on what matters (``check_finite``: the input and the loss, or the samples).
"""
import contextlib
import threading

import numpy as np

from ..backend import default_array_module, get_array_module, is_cupy_array, to_numpy

_deferred = threading.local()   # .depth > 0 inside finite_checks_deferred(), in this thread


def _deferred_depth():
    """How many finite_checks_deferred() blocks the calling thread is inside (each thread its
    own: one thread's deferral leaves the NaN/Inf checks of the others on)."""
    return getattr(_deferred, "depth", 0)


class Layer:
    """Base class: holds ``params`` and ``grads`` and validates inputs."""

    def __init__(self):
        self.params = {}
        self.grads = {}

    def _lazy_parameters(self, channels, dtype, seed=0):
        """Remember the dtype and seed, and build the parameters now when ``channels`` is
        given, else on the first input (``_prepare``). Subclasses define
        ``_build(channels, xp, dtype)``; without a dtype, parameters made now are float32 and
        parameters made on first use take the input's dtype."""
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.seed = seed
        self.channels = None
        if channels is not None:
            self._build(channels, default_array_module(), self.dtype or np.float32)

    def _prepare(self, x, name):
        """Check an input, and build the parameters from its channel count on first use."""
        check_same_device(x, self.params, name)
        check_images(x, name, self.channels)
        if self.channels is None:
            self._build(x.shape[1], get_array_module(x), self.dtype or x.dtype)

    def release(self):
        """Drop what forward cached for backward (the memory-saving mode calls this)."""
        self._cache = None

    def zero_grad(self):
        for name, param in self.params.items():
            self.grads[name] = get_array_module(param).zeros_like(param)

    def state(self):
        """Non-parameter state saved in checkpoints (ActNorm's flag, ...). None here."""
        return {}

    def load_state(self, state):
        pass

    def __repr__(self):
        shapes = ", ".join(f"{name}{tuple(p.shape)}" for name, p in self.params.items())
        return f"{type(self).__name__}({shapes})"


class NonFiniteError(ValueError):
    """An array holds NaN or Inf. A ValueError, so that callers may catch exactly this case
    (the trainer skips such a step) without hiding other bad input."""


def check_images(x, name="x", channels=None, finite=True):
    """Raise a clear error unless ``x`` is a floating (B, C, H, W) array, none of it empty.

    ``channels``: the channel count the layer's weights expect (None: any).
    ``finite``: also refuse NaN and Inf values, which would spread silently through a flow.
    """
    if not hasattr(x, "ndim") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be a NumPy or CuPy array, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have 4 dimensions (batch, channels, height, width), "
                         f"got shape {tuple(x.shape)}")
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    B, C, H, W = x.shape
    if B == 0 or C == 0 or H == 0 or W == 0:
        raise ValueError(f"{name} has an empty dimension: shape {tuple(x.shape)}")
    if channels is not None and C != channels:
        raise ValueError(f"{name} has {C} channels but the layer was built for {channels}")
    if finite and not _deferred_depth():
        check_finite({name: x})


def check_finite(arrays, fetch=None):
    """Raise NonFiniteError naming the first of ``arrays`` (name -> array, all on one device)
    that holds NaN or Inf. One device→host transfer for all of them: the flags are computed on
    the device and brought back together, with ``fetch`` (a 0-d array, e.g. the loss) when
    given, whose value is returned as a Python float."""
    xp = get_array_module(next(iter(arrays.values())))
    values = [xp.isfinite(array).all().astype(np.float64) for array in arrays.values()]
    if fetch is not None:
        values.append(fetch.astype(np.float64))
    on_host = to_numpy(xp.stack(values))
    for name, finite in zip(arrays, on_host):
        if not finite:
            raise NonFiniteError(f"{name} contains NaN or Inf")
    return float(on_host[-1]) if fetch is not None else None


@contextlib.contextmanager
def finite_checks_deferred():
    """Inside, ``check_images`` skips its NaN/Inf test (and NumPy does not warn about
    overflows): the caller promises one ``check_finite`` on what the layers computed. Per
    thread, as NumPy's errstate is: another thread's layers keep checking."""
    _deferred.depth = _deferred_depth() + 1
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            yield
    finally:
        _deferred.depth -= 1


def check_same_device(x, params, name="x"):
    """Raise a clear TypeError when ``x`` and the layer's parameters live on different devices
    (a NumPy weight with a CuPy input, or the reverse), instead of an error deep in a kernel."""
    if not params:
        return
    x_on_gpu = is_cupy_array(x)
    for param_name, param in params.items():
        if is_cupy_array(param) != x_on_gpu:
            where = {True: "a CuPy (GPU) array", False: "a NumPy (CPU) array"}
            raise TypeError(f"{name} is {where[x_on_gpu]} but the layer's parameter "
                            f"{param_name!r} is {where[not x_on_gpu]}: build the layer after "
                            f"nfcore.set_backend(\"{'gpu' if x_on_gpu else 'cpu'}\"), or move "
                            f"the input with nfcore.backend.to_device")


def check_gradient(dy, expected_shape, name="dy"):
    """Raise a clear error unless forward has run (``expected_shape`` is not None) and ``dy``
    has the shape of forward's output, ``expected_shape``."""
    if expected_shape is None:
        raise RuntimeError("backward called before forward")
    if tuple(dy.shape) != tuple(expected_shape):
        raise ValueError(f"{name} has shape {tuple(dy.shape)}, forward's output had "
                         f"{tuple(expected_shape)}")
