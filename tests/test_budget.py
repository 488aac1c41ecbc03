"""The operation budget: how many array operations SimpleCNN's training step and batch-1
forward issue (each a Python dispatch, and on a GPU a kernel launch). Counted on
array-api-strict by `counting.count_operations`; the budgets are the counts recorded in
docs/performance.md, and a change that issues more fails here."""

import pytest

from counting import count_operations, simple_cnn_counts

#: (training step at batch 128, batch-1 forward), per input-gradient method. Raised on
#: 2026-11-28 from (166, 42), (189, 42), (163, 42) by the permutation im2col: for conv2 and
#: conv3, reshape + permute_dims (a view) + reshape in place of four slices (not counted: views)
#: + stack + reshape, 1.4-1.7x faster (`python benchmarks/micro.py --only im2col`).
BUDGET = {"dilation": (168, 44), "dilation-zeros": (191, 44), "col2im": (165, 44)}


@pytest.mark.parametrize("method", sorted(BUDGET))
def test_operation_budget(method):
    train, infer = simple_cnn_counts(input_grad=method)
    step_budget, forward_budget = BUDGET[method]
    assert train.total <= step_budget, f"training step: {train!r}"
    assert infer.total <= forward_budget, f"batch-1 forward: {infer!r}"
    # the counter itself works: a step cannot take fewer than its matrix products and updates
    assert train.by_name["matmul"] >= 14 and train.total > 100
    assert infer.by_name["matmul"] == 5


def test_counter_counts_functions_and_operators():
    import array_api_strict as xp

    a = xp.ones((3,))
    with count_operations() as counts:
        b = xp.reshape(a, (1, 3)) + 1.0
        b[0, 0] = 2.0
        _ = b[0, ...]  # a view: not counted
    assert dict(counts.by_name) == {"reshape": 1, "add": 1, "setitem": 1}
