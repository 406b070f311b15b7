"""Composite: a layer or network built from named parts (a coupling's networks, a network's
convolutions, the two convolutions of EmergingConv).

Its ``params`` and ``grads`` are live views of the parts' dictionaries under flattened names
"part.name" (nested parts give "nn.conv1.weight")::

    coupling.params["nn.conv1.weight"]       is  coupling.nn.conv1.params["weight"]
    coupling.params["nn.conv1.weight"] = w   sets coupling.nn.conv1.params["weight"]

so an optimizer or a checkpoint loader can treat a composite exactly like a single layer
(in-place updates and assignments both reach the part), and the parts keep owning their arrays
(their forward / backward read them from there).
"""
import numpy as np

from ..layers.base import Layer


def spawn_seed(seed, index):
    """A distinct, reproducible seed for part ``index`` of something seeded with ``seed``.

    numpy.random.default_rng accepts a list of integers; appending the part's index gives every
    part its own random stream (seed + index would let part 1 of seed 0 equal part 0 of seed 1).
    seed None (fresh randomness) stays None.
    """
    if seed is None:
        return None
    return [*np.atleast_1d(seed).tolist(), index]


class Namespaced(dict):
    """The dictionaries of several parts seen as one, under keys "part.name".

    A real dict (code that checks ``isinstance(params, dict)`` accepts it), filled with the
    parts' own arrays when the view is made; assigning an entry also assigns it in the part.
    """

    def __init__(self, dicts):
        super().__init__((f"{part}.{name}", value)
                         for part, d in dicts.items() for name, value in d.items())
        self._dicts = dicts          # part name -> that part's params (or grads) dict

    def __setitem__(self, key, value):
        part, _, name = key.partition(".")
        if part not in self._dicts or name not in self._dicts[part]:
            raise KeyError(f"{key!r}: no such parameter (a composite's entries are its parts')")
        self._dicts[part][name] = value
        super().__setitem__(key, value)

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def _refuse(self, *args, **kwargs):
        raise TypeError("entries of a composite's params / grads cannot be removed or added")

    __delitem__ = pop = popitem = clear = setdefault = _refuse


class Composite(Layer):
    """Base class of anything made of named parts held in ``self.parts`` (name -> part)."""

    def __init__(self):
        # Layer.__init__ is not called: params and grads are the parts' views, not own dicts.
        self.parts = {}

    @property
    def params(self):
        return Namespaced({name: part.params for name, part in self.parts.items()})

    @property
    def grads(self):
        return Namespaced({name: part.grads for name, part in self.parts.items()})

    def zero_grad(self):
        for part in self.parts.values():
            part.zero_grad()

    def release(self):
        self._cache = None
        for part in self.parts.values():
            part.release()

    def state(self):
        """The parts' states under "part.key" (e.g. an inner ActNorm's "norm1.initialized")."""
        return {f"{name}.{key}": value for name, part in self.parts.items()
                for key, value in part.state().items()}

    def load_state(self, state):
        for name, part in self.parts.items():
            prefix = name + "."
            part.load_state({key[len(prefix):]: value for key, value in state.items()
                             if key.startswith(prefix)})

    def __getattr__(self, name):
        # parts read as attributes: coupling.nn, network.conv1 (only called for missing names)
        parts = self.__dict__.get("parts", {})
        if name in parts:
            return parts[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
