"""The backend registry: a device string in, a `Backend` (namespace + device) out.

Device strings are ``family[:argument]``:

==================  ==========================================================
``cpu``, ``numpy``  NumPy on the host
``cuda``            CuPy on GPU 0; ``cuda:N`` on GPU N
``torch``           PyTorch tensors on the CPU (``torch:cpu``); ``torch:cuda:N`` on GPU N
``strict``          array-api-strict (``strict:cpu``, ``strict:device1``, ``strict:no_float64``)
``jax``             jax.numpy on JAX's default device; ``jax:cpu``, ``jax:cuda:N``
==================  ==========================================================

Every family is imported lazily, probed once, and the outcome cached, failures included, so an
unavailable backend costs one probe and always reports the same reason. Other packages add
families with `register_backend` or through the ``xpcnn.backends`` entry-point group, whose
entries name a factory ``make(argument: str | None) -> Backend``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

from .base import Backend, BackendUnavailable, blas_single_threaded, blas_threads

__all__ = [
    "Backend",
    "BackendStatus",
    "BackendUnavailable",
    "available_backends",
    "backend_of",
    "blas_single_threaded",
    "blas_threads",
    "get_backend",
    "host_copy",
    "register_backend",
    "to_numpy",
]

ENTRY_POINT_GROUP = "xpcnn.backends"

# family -> factory, or "module:function" until first use (keeps imports lazy)
_factories: dict[str, object] = {
    "cpu": "xpcnn.backends._numpy:make",
    "cuda": "xpcnn.backends._cupy:make",
    "torch": "xpcnn.backends._torch:make",
    "strict": "xpcnn.backends._strict:make",
    "jax": "xpcnn.backends._jax:make",
}
_aliases = {"numpy": "cpu"}
# what a bare family name means, so that "cuda" and "cuda:0" share one probe and one object
_default_arg = {"cuda": "0", "torch": "cpu", "strict": "cpu"}
# specs listed by available_backends(), per family
_listed: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu",),
    "cuda": ("cuda:0",),
    "torch": ("torch:cpu", "torch:cuda:0"),
    "strict": ("strict:cpu", "strict:device1", "strict:no_float64"),
    "jax": ("jax:cpu", "jax:cuda:0"),
}
_cache: dict[tuple[str, str | None], Backend | BackendUnavailable] = {}
_by_name: dict[str, Backend] = {}
_entry_points_loaded = False
_entry_point_errors: dict[str, str] = {}


@dataclass(frozen=True)
class BackendStatus:
    """One line of `available_backends`: a device string, whether it works, and why not."""

    name: str
    available: bool
    reason: str


def register_backend(family, factory, *, listed=None):
    """Add a backend family.

    ``factory(argument)`` receives what follows ``family:`` in the device string (or None) and
    returns a `Backend`, raising `BackendUnavailable` with the reason when it cannot.
    ``listed`` are the device strings `available_backends` should report (default: the family).
    Raises ValueError for an empty family name or one containing ':'.
    """
    if not family or ":" in family:
        raise ValueError(f"backend family must be a non-empty name without ':', got {family!r}")
    _factories[family] = factory
    _listed[family] = tuple(listed) if listed else (family,)
    for key in [k for k in _cache if k[0] == family]:
        del _cache[key]


def _load_entry_points():
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _factories:
            continue  # built-in families cannot be replaced by a plugin
        try:
            register_backend(ep.name, ep.load())
        except Exception as exc:  # a broken plugin must not break the registry
            _entry_point_errors[ep.name] = f"entry point {ep.value!r} failed to load: {exc}"


def _valid_specs():
    return ", ".join(
        [
            "cpu",
            "numpy",
            "cuda",
            "cuda:N",
            "torch",
            "torch:cpu",
            "torch:cuda:N",
            "strict",
            "strict:device1",
            "strict:no_float64",
            "jax",
            "jax:cpu",
            "jax:cuda:N",
        ]
        + [f for f in _factories if f not in ("cpu", "cuda", "torch", "strict", "jax")]
    )


def _parse(spec):
    if not isinstance(spec, str):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda:0', got {spec!r}")
    family, _, arg = spec.strip().partition(":")
    family = _aliases.get(family, family)
    if family not in _factories:
        _load_entry_points()
    if family in _entry_point_errors:
        raise BackendUnavailable(_entry_point_errors[family])
    if family not in _factories:
        raise ValueError(f"unknown device {spec!r}; valid devices: {_valid_specs()}")
    return family, arg or _default_arg.get(family)


def get_backend(spec="cpu"):
    """Resolve a device string (or pass a `Backend` through). Results are cached.

    Raises ValueError for a malformed or unknown string (listing the valid ones) and
    `BackendUnavailable` for a known backend this machine cannot run, with the reason.
    """
    if isinstance(spec, Backend):
        return spec
    key = _parse(spec)
    if key not in _cache:
        factory = _factories[key[0]]
        if isinstance(factory, str):
            module, _, func = factory.partition(":")
            factory = _factories[key[0]] = getattr(importlib.import_module(module), func)
        try:
            backend = factory(key[1])
            _cache[key] = _by_name.setdefault(backend.name, backend)
        except BackendUnavailable as exc:
            _cache[key] = exc
    result = _cache[key]
    if isinstance(result, BackendUnavailable):
        raise BackendUnavailable(f"{spec}: {result}")
    return result


def available_backends():
    """Every known backend with its status and, when unavailable, the reason."""
    _load_entry_points()
    statuses = []
    for family in _factories:
        for spec in _listed.get(family, (family,)):
            try:
                statuses.append(BackendStatus(get_backend(spec).name, True, ""))
            except (BackendUnavailable, ValueError) as exc:
                statuses.append(BackendStatus(spec, False, str(exc).removeprefix(f"{spec}: ")))
    for family, reason in _entry_point_errors.items():
        statuses.append(BackendStatus(family, False, reason))
    return statuses


def backend_of(x):
    """The registered backend that owns array ``x`` (its namespace and device). Raises
    ValueError when no backend does, TypeError when ``x`` is not an array."""
    from array_api_compat import array_namespace, device

    xp, dev = array_namespace(x), device(x)
    for backend in list(_by_name.values()):
        if backend.xp is xp and backend.device == dev:
            return backend
    for spec in _guess_specs(xp, dev):
        backend = get_backend(spec)
        if backend.device == dev:
            return backend
    raise ValueError(f"no registered backend owns an array of {xp.__name__} on {dev!r}")


def _guess_specs(xp, dev):
    import array_api_compat as c

    if c.is_numpy_namespace(xp):
        return ["cpu"]
    if c.is_torch_namespace(xp):
        return [f"torch:{dev}"]
    if c.is_cupy_namespace(xp):
        return [f"cuda:{dev.id}"]
    if c.is_jax_namespace(xp):
        return ["jax:cpu" if dev.platform == "cpu" else f"jax:cuda:{dev.id}"]
    if c.is_array_api_strict_namespace(xp):
        name = getattr(dev, "_device", "CPU_DEVICE")
        return ["strict:cpu" if name == "CPU_DEVICE" else f"strict:{name}"]
    return []


def to_numpy(x):
    """A NumPy copy of any supported array (NumPy, CuPy, torch, array-api-strict, ...). Raises
    ValueError for an array no backend owns, TypeError for a non-array."""
    import numpy as np

    if isinstance(x, np.ndarray | np.generic):
        return np.asarray(x)
    return backend_of(x).to_host(x)


def host_copy(x) -> np.ndarray:
    """A C-ordered NumPy copy of any supported array that never shares memory with it (what
    `xpcnn.nn.Module.state_dict` hands out: `to_numpy` of a NumPy or torch CPU array is the
    same memory, and a weight may be stored in another order, `xpcnn.conv.matrix_order`)."""
    return np.array(to_numpy(x), order="C", copy=True)


def _reset_cache():
    """Forget every probe (tests use it to simulate a changed machine)."""
    global _entry_points_loaded
    _cache.clear()
    _by_name.clear()
    _entry_point_errors.clear()
    _entry_points_loaded = False
