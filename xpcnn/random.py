"""Random numbers on the device: the Array API has no random module, so each backend supplies one.

A `Generator` draws arrays on one backend's device:

    gen = random.generator("torch:cpu", seed=0)
    u = gen.uniform((128, 256), "float32")        # [0, 1), on the backend's device
    keep = gen.bernoulli(0.9, (128, 256))         # bool
    offsets = gen.integers(0, 5, (128,))          # int64 in [0, 5)
    saved = gen.state()                           # JSON-able: checkpoints store it
    gen.set_state(saved)                          # ... and a resume continues the same stream

Which generator a backend gets (`generator`):

==========================  =============================================================
``cpu`` (NumPy)             NumPy's ``Generator`` (PCG64); state: the bit generator's dict
``torch:*``                 a ``torch.Generator`` on the tensor's device; state: its bytes
``jax:*``                   a JAX key (``jax.random``), split at every draw; state: the key
``cuda:*`` (CuPy)           counter-based: draw k comes from a cuRAND Philox generator seeded
                            with (seed, k); state: the seed and the counter
anything else               the fallback: NumPy draws on the host, moved to the device
==========================  =============================================================

Another backend family can supply its own with `register`.

Layers never receive a generator as an argument: they ask for `current` one, which is the one
installed by ``with random.using(gen):`` (the trainer and `xpcnn.step.TrainStep` install
theirs) or else a default generator per backend (seeded with 0; `manual_seed` reseeds them).

Compiled steps. NumPy, torch and CuPy generators are stateful objects that live outside the
step: a step that draws changes them as a side effect (a torch CUDA graph replays its draws
with fresh numbers because the generator is registered with the graph, see
`xpcnn.backends._torch`). A JAX key cannot be a side effect of a jitted function, so for JAX
(``functional = True``) the key is an explicit input and output of the step:
`TrainStep.function` takes ``rng`` (the key, or None for stateful generators), draws from
``gen.with_key(rng)`` and returns the advanced key, which the caller stores back with
``gen.key = new_key``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import numpy as np

__all__ = [
    "Generator",
    "HostGenerator",
    "RowSlice",
    "current",
    "default",
    "generator",
    "manual_seed",
    "register",
    "using",
]


class Generator:
    """Draws random arrays on ``backend``'s device from ``seed`` (a non-negative int).

    Subclasses implement the four draws, `state` and `set_state`. ``key`` is None for a
    stateful generator; for a functional one (JAX) it is the array that a compiled function
    takes and returns."""

    functional = False
    key = None

    def __init__(self, backend, seed=0):
        from .backends import get_backend

        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.backend = get_backend(backend)
        self.seed = int(seed)

    def __repr__(self):
        return f"{type(self).__name__}({self.backend.name!r}, seed={self.seed})"

    def uniform(self, shape, dtype="float32"):
        """Uniform floats in [0, 1) of ``shape`` and ``dtype`` (a name)."""
        raise NotImplementedError

    def normal(self, shape, dtype="float32"):
        """Standard normal floats of ``shape`` and ``dtype``."""
        raise NotImplementedError

    def bernoulli(self, p, shape):
        """A boolean array of ``shape``, each element True with probability ``p``."""
        return self.uniform(shape, "float32") < float(p)

    def integers(self, low, high, shape):
        """int64 integers uniform in ``[low, high)`` of ``shape``."""
        raise NotImplementedError

    def state(self) -> dict:
        """The generator's position as a JSON-able dict (``set_state`` restores it)."""
        raise NotImplementedError

    def set_state(self, state) -> None:
        """Continue from a `state`; raises ValueError for one of another kind or malformed."""
        raise NotImplementedError

    def with_key(self, key) -> Generator:
        """The generator to draw from inside a pure (compiled) function given its ``key``
        input: itself for a stateful generator, a new one on ``key`` for a functional one."""
        return self

    def _check_kind(self, state, kind):
        if not isinstance(state, dict) or state.get("kind") != kind:
            found = state.get("kind") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{type(self).__name__}: expected a {kind!r} state, got {found!r}")


def _shape(shape):
    return (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)


class HostGenerator(Generator):
    """The fallback: NumPy's PCG64 on the host, each draw copied to the device."""

    kind = "numpy"

    def __init__(self, backend, seed=0):
        super().__init__(backend, seed)
        self._rng = np.random.default_rng(self.seed)

    def _put(self, host, dtype):
        return self.backend.asarray(host, dtype)

    def uniform(self, shape, dtype="float32"):
        return self._put(self._rng.random(_shape(shape), dtype=np.dtype(dtype)), dtype)

    def normal(self, shape, dtype="float32"):
        return self._put(self._rng.standard_normal(_shape(shape), dtype=np.dtype(dtype)), dtype)

    def bernoulli(self, p, shape):
        return self._put(self._rng.random(_shape(shape)) < p, "bool")

    def integers(self, low, high, shape):
        return self._put(self._rng.integers(low, high, _shape(shape), dtype=np.int64), "int64")

    def state(self):
        return {
            "kind": self.kind,
            "seed": self.seed,
            "bit_generator": self._rng.bit_generator.state,
        }

    def set_state(self, state):
        self._check_kind(state, self.kind)
        try:
            self._rng.bit_generator.state = state["bit_generator"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{type(self).__name__}: malformed state ({exc})") from None


class NumpyGenerator(HostGenerator):
    """NumPy's Generator on NumPy's own device, the host: no copy."""

    def _put(self, host, dtype):
        return host if host.dtype == np.dtype(dtype) else host.astype(dtype)


class TorchGenerator(Generator):
    """A ``torch.Generator`` on the backend's device (CPU or CUDA). Its state is saved as the
    bytes of ``get_state()``. On CUDA the generator is registered with every captured graph
    (``CUDAGraph.register_generator_state``), so each replay draws new numbers."""

    kind = "torch"

    def __init__(self, backend, seed=0):
        super().__init__(backend, seed)
        import torch

        self.torch = torch
        self.device = self.backend.device
        self.torch_generator = torch.Generator(device=self.device)
        self.torch_generator.manual_seed(self.seed)

    def _dtype(self, dtype):
        return getattr(self.torch, dtype)

    def uniform(self, shape, dtype="float32"):
        t = self.torch
        return t.rand(
            _shape(shape),
            generator=self.torch_generator,
            dtype=self._dtype(dtype),
            device=self.device,
        )

    def normal(self, shape, dtype="float32"):
        t = self.torch
        return t.randn(
            _shape(shape),
            generator=self.torch_generator,
            dtype=self._dtype(dtype),
            device=self.device,
        )

    def bernoulli(self, p, shape):
        return self.uniform(shape, "float32") < p

    def integers(self, low, high, shape):
        return self.torch.randint(
            low,
            high,
            _shape(shape),
            generator=self.torch_generator,
            dtype=self.torch.int64,
            device=self.device,
        )

    def state(self):
        raw = self.torch_generator.get_state().numpy().tobytes()
        return {"kind": self.kind, "seed": self.seed, "bytes": raw.hex()}

    def set_state(self, state):
        self._check_kind(state, self.kind)
        try:
            raw = np.frombuffer(bytes.fromhex(state["bytes"]), dtype=np.uint8).copy()
            self.torch_generator.set_state(self.torch.from_numpy(raw))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{type(self).__name__}: malformed state ({exc})") from None


class JaxGenerator(Generator):
    """A JAX PRNG key (raw ``uint32[2]``, threefry), split at every draw: ``key, sub =
    split(key)`` and the draw uses ``sub``. Functional: inside a jitted function the key is
    an input and the advanced key an output (see the module docstring)."""

    kind = "jax"
    functional = True

    def __init__(self, backend, seed=0, key=None):
        super().__init__(backend, seed)
        import jax

        self.jax = jax
        self.key = (
            jax.device_put(jax.random.PRNGKey(self.seed), self.backend.device)
            if key is None
            else key
        )

    def _next(self):
        self.key, sub = self.jax.random.split(self.key)
        return sub

    def uniform(self, shape, dtype="float32"):
        return self.jax.random.uniform(self._next(), _shape(shape), dtype=self.backend.dtype(dtype))

    def normal(self, shape, dtype="float32"):
        return self.jax.random.normal(self._next(), _shape(shape), dtype=self.backend.dtype(dtype))

    def bernoulli(self, p, shape):
        return self.jax.random.bernoulli(self._next(), p, _shape(shape))

    def integers(self, low, high, shape):
        return self.jax.random.randint(
            self._next(), _shape(shape), low, high, dtype=self.backend.dtype("int64")
        )

    def with_key(self, key):
        twin = object.__new__(JaxGenerator)
        twin.__dict__.update(self.__dict__)
        twin.key = key
        return twin

    def state(self):
        return {"kind": self.kind, "seed": self.seed, "key": np.asarray(self.key).tolist()}

    def set_state(self, state):
        self._check_kind(state, self.kind)
        key = np.asarray(state.get("key"), dtype=np.int64)
        if key.shape != (2,) or key.min() < 0 or key.max() >= 2**32:
            raise ValueError(f"JaxGenerator: malformed key {state.get('key')!r}")
        self.key = self.jax.device_put(key.astype(np.uint32), self.backend.device)


class CupyGenerator(Generator):
    """CuPy: counter-based. Draw number k comes from a fresh cuRAND Philox4x32-10 generator
    (``cupy.random.RandomState``) seeded with a 64-bit hash of (seed, k), so the whole state is
    two integers. Costs one generator set-up per draw (Philox needs no state initialisation).
    Not exercised by the CPU test suite; the GPU check runs it."""

    kind = "cupy"

    def __init__(self, backend, seed=0):
        super().__init__(backend, seed)
        self.counter = 0

    def _next(self):
        import cupy

        words = np.random.SeedSequence([self.seed, self.counter]).generate_state(2, np.uint32)
        self.counter += 1
        seed = (int(words[0]) << 32) | int(words[1])
        philox = cupy.cuda.curand.CURAND_RNG_PSEUDO_PHILOX4_32_10
        with self.backend.activate():
            return cupy.random.RandomState(seed, method=philox)

    def uniform(self, shape, dtype="float32"):
        rs = self._next()
        with self.backend.activate():
            return rs.random_sample(_shape(shape), dtype=np.dtype(dtype))

    def normal(self, shape, dtype="float32"):
        rs = self._next()
        with self.backend.activate():
            return rs.standard_normal(_shape(shape), dtype=np.dtype(dtype))

    def integers(self, low, high, shape):
        rs = self._next()
        with self.backend.activate():
            return rs.randint(low, high, _shape(shape), dtype=np.int64)

    def state(self):
        return {"kind": self.kind, "seed": self.seed, "counter": self.counter}

    def set_state(self, state):
        self._check_kind(state, self.kind)
        counter = state.get("counter")
        if isinstance(counter, bool) or not isinstance(counter, int) or counter < 0:
            raise ValueError(f"CupyGenerator: malformed counter {counter!r}")
        self.seed, self.counter = int(state.get("seed", self.seed)), counter


class RowSlice(Generator):
    """Draws as if for a whole batch of ``total`` samples and keeps rows ``lo:hi``: a draw
    whose first axis has ``hi - lo`` entries is made with ``total`` entries and sliced, any
    other draw passes through. A data-parallel rank holding samples ``lo:hi`` of a global
    batch thus gets exactly the numbers one process would draw for those samples, and every
    rank's ``gen`` advances alike (its state stays the same on all ranks)."""

    def __init__(self, gen: Generator, total: int, lo: int, hi: int):
        self.gen, self.total, self.lo, self.hi = gen, int(total), int(lo), int(hi)
        self.backend, self.seed = gen.backend, gen.seed

    def _draw(self, draw, shape, *args):
        shape = _shape(shape)
        if not shape or shape[0] != self.hi - self.lo:
            return draw(*args, shape)
        whole = draw(*args, (self.total, *shape[1:]))
        return whole[self.lo : self.hi, ...]

    def uniform(self, shape, dtype="float32"):
        return self._draw(lambda s: self.gen.uniform(s, dtype), shape)

    def normal(self, shape, dtype="float32"):
        return self._draw(lambda s: self.gen.normal(s, dtype), shape)

    def bernoulli(self, p, shape):
        return self._draw(lambda s: self.gen.bernoulli(p, s), shape)

    def integers(self, low, high, shape):
        return self._draw(lambda s: self.gen.integers(low, high, s), shape)


_FACTORIES: dict[str, Callable] = {
    "cpu": NumpyGenerator,
    "torch": TorchGenerator,
    "jax": JaxGenerator,
    "cuda": CupyGenerator,
}


def register(family: str, factory: Callable) -> None:
    """Use ``factory(backend, seed) -> Generator`` for the backends of ``family``."""
    _FACTORIES[family] = factory


def generator(backend, seed=0) -> Generator:
    """A new generator on ``backend`` (a device string or Backend), seeded with ``seed``: the
    backend family's own (`register`), or the host fallback `HostGenerator`."""
    from .backends import get_backend

    backend = get_backend(backend)
    return _FACTORIES.get(backend.family, HostGenerator)(backend, seed)


# --- the current generator ----------------------------------------------------------------------

_CURRENT = contextvars.ContextVar("xpcnn_generator", default=None)
_DEFAULTS: dict[str, Generator] = {}
_DEFAULT_SEED = [0]


@contextlib.contextmanager
def using(gen: Generator) -> Iterator[Generator]:
    """Make ``gen`` the generator that layers draw from (`current`) inside the block."""
    token = _CURRENT.set(gen)
    try:
        yield gen
    finally:
        _CURRENT.reset(token)


def default(backend) -> Generator:
    """The default generator of ``backend`` (created on first use, seeded by `manual_seed`)."""
    from .backends import get_backend

    backend = get_backend(backend)
    gen = _DEFAULTS.get(backend.name)
    if gen is None:
        gen = _DEFAULTS[backend.name] = generator(backend, _DEFAULT_SEED[0])
    return gen


def current(backend) -> Generator:
    """The generator installed by `using`, or else ``backend``'s `default`. Raises ValueError
    when the installed one belongs to another backend than ``backend`` (a device string or
    Backend)."""
    from .backends import get_backend

    gen = _CURRENT.get()
    if gen is None:
        return default(backend)
    backend = get_backend(backend)
    if gen.backend != backend:
        raise ValueError(
            f"the active random generator draws on {gen.backend.name}, the layer runs on "
            f"{backend.name}"
        )
    return gen


def manual_seed(seed: int) -> None:
    """Reseed every backend's default generator (those made later too)."""
    _DEFAULT_SEED[0] = int(seed)
    _DEFAULTS.clear()
