"""The operation budget: how many array operations SimpleCNN's training step and batch-1
forward issue (each a Python dispatch, and on a GPU a kernel launch). Counted on
array-api-strict by `counting.count_operations`; the budgets are the counts recorded in
docs/performance.md, and a change that issues more fails here."""

import pytest

from counting import count_operations, simple_cnn_counts

#: (training step at batch 128, batch-1 forward), per input-gradient method. Raised on
#: 2026-11-28 from (166, 42), (189, 42), (163, 42) by two views per forward (the permutation
#: im2col: reshape + permute_dims in place of one stack) and two per step (the weight gradient
#: product in the weight's memory order), each change measured faster in benchmarks/micro.py.
BUDGET = {"dilation": (170, 44), "dilation-zeros": (193, 44), "col2im": (167, 44)}


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
