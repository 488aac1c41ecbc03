"""A counting wrapper around the array-api-strict namespace: how many array operations a piece
of xpcnn code issues (each one a Python dispatch, and on a GPU a kernel launch).

    with count_operations() as counts:
        step(x, labels, 0.1)
    counts.total, counts.by_name

Counted: every call of a namespace function (``reshape``, ``matmul``, ``zeros``, ...) and every
array operator that computes or writes (``+``, ``@``, ``>``, ``+=``, ``x[i] = v``). Not counted:
indexing that only makes a view (``x[1:3]``), attribute reads and calls nested inside a counted
call. Run as a script it prints the counts of SimpleCNN's training step and batch-1 forward.
"""

from __future__ import annotations

import collections
import contextlib
import functools

import array_api_strict

ARRAY = type(array_api_strict.asarray([0.0]))
NOT_COUNTED = {"__getitem__", "__array_namespace__", "__bool__", "__float__", "__int__",
               "__index__", "__complex__", "__iter__", "__array__", "__buffer__", "__repr__",
               "__str__", "__new__", "__reduce__", "__dlpack__", "__dlpack_device__"}  # fmt: skip
SKIP_FUNCTIONS = {"Device", "finfo", "iinfo", "isdtype", "result_type", "can_cast", "set_flags",
                  "get_flags", "reset_flags", "ArrayAPIStrictFlags", "__array_api_version__",
                  "__array_namespace_info__"}  # fmt: skip


class Counts:
    """Operation counts by name; `total` is their sum."""

    def __init__(self):
        self.by_name = collections.Counter()
        self.depth = 0

    @property
    def total(self) -> int:
        return sum(self.by_name.values())

    def __repr__(self):
        top = ", ".join(f"{k} {v}" for k, v in self.by_name.most_common())
        return f"{self.total} operations: {top}"


def _wrap(fn, name, counts):
    @functools.wraps(fn)
    def counted(*args, **kwargs):
        if counts.depth == 0:
            counts.by_name[name] += 1
        counts.depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            counts.depth -= 1

    return counted


@contextlib.contextmanager
def count_operations():
    """Count array-api-strict operations issued inside the block (see the module docstring)."""
    counts = Counts()
    patched = []
    for name in array_api_strict.__all__:
        fn = getattr(array_api_strict, name, None)
        if name in SKIP_FUNCTIONS or not callable(fn) or isinstance(fn, type):
            continue
        patched.append((array_api_strict, name, fn))
    for name, fn in list(vars(ARRAY).items()):
        if (
            name.startswith("__")
            and name.endswith("__")
            and callable(fn)
            and name not in NOT_COUNTED
        ):
            patched.append((ARRAY, name, fn))
    for owner, name, fn in patched:
        setattr(owner, name, _wrap(fn, name.strip("_"), counts))
    try:
        yield counts
    finally:
        for owner, name, fn in patched:
            setattr(owner, name, fn)


def simple_cnn_counts(batch=128, input_grad="dilation"):
    """Operations of one SimpleCNN training step (SGD with momentum) at ``batch`` and of one
    batch-1 forward in eval mode, on array-api-strict."""
    import numpy as np

    import xpcnn
    from xpcnn.step import TrainStep

    backend = xpcnn.get_backend("strict:cpu")
    model = xpcnn.SimpleCNN(device="strict:cpu", input_grad=input_grad)
    step = TrainStep(model, xpcnn.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    rng = np.random.default_rng(0)
    x = backend.asarray(rng.random((batch, 1, 28, 28)), "float32")
    y = backend.asarray(rng.integers(0, 10, batch), "int64")
    step(x, y, 0.1)  # a first step: scratch buffers are made here
    with count_operations() as train:
        step(x, y, 0.1)
    model.eval()
    one = backend.asarray(rng.random((1, 1, 28, 28)), "float32")
    model(one)
    with count_operations() as infer:
        model(one)
    return train, infer


if __name__ == "__main__":
    for method in ("dilation", "dilation-zeros", "col2im"):
        try:
            train, infer = simple_cnn_counts(input_grad=method)
        except ValueError as exc:
            print(f"{method}: {exc}")
            continue
        print(f"{method}: training step {train!r}\n  batch-1 forward {infer!r}")
