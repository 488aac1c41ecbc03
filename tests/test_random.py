"""Randomness on the device (xpcnn.random) and augmentation (xpcnn.augment): draws live on the
backend's device, states are JSON-able and resume the same stream, the augmented batch equals a
per-image loop with the same draws; the compiled JAX step threads its key in and out."""

import json

import numpy as np
import pytest

from xpcnn import augment, nn, optim, random
from xpcnn.backends import BackendUnavailable, get_backend, to_numpy
from xpcnn.step import TrainStep


def test_draws_are_on_the_device_with_the_asked_dtype(backend):
    gen = random.generator(backend, 0)
    dtype = "float32"
    u = gen.uniform((64, 32), dtype)
    n = gen.normal((4096,), dtype)
    b = gen.bernoulli(0.3, (4096,))
    k = gen.integers(2, 7, (4096,))
    for a in (u, n, b, k):
        assert backend.owns(a), type(a)
    assert u.dtype == backend.dtype(dtype) and n.dtype == backend.dtype(dtype)
    assert b.dtype == backend.dtype("bool") and k.dtype == backend.dtype("int64")
    u, n, b, k = map(to_numpy, (u, n, b, k))
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.05
    assert abs(n.mean()) < 0.1 and abs(n.std() - 1) < 0.1
    assert abs(b.mean() - 0.3) < 0.05
    assert k.min() == 2 and k.max() == 6


def test_state_round_trips_through_json(backend):
    """A saved state (JSON, as checkpoints store it) continues the exact same stream."""
    gen = random.generator(backend, 5)
    gen.uniform((3,))
    saved = json.loads(json.dumps(gen.state()))
    first = [to_numpy(gen.uniform((4, 5))), to_numpy(gen.integers(0, 9, (7,)))]
    other = random.generator(backend, 99)
    other.set_state(saved)
    again = [to_numpy(other.uniform((4, 5))), to_numpy(other.integers(0, 9, (7,)))]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    different = to_numpy(random.generator(backend, 6).uniform((4, 5)))
    assert not np.array_equal(different, to_numpy(random.generator(backend, 5).uniform((4, 5))))


def test_row_slices_of_ranks_put_together_are_the_whole_draw(backend):
    """`random.RowSlice`: ranks holding rows 0:3 and 3:5 of a 5-sample batch get exactly what
    one process draws for the 5, and end in the same generator state; a draw that is not per
    sample passes through."""
    whole = random.generator(backend, 7)
    want = [whole.integers(0, 9, (5,)), whole.uniform((5, 2)), whole.bernoulli(0.5, (5,))]
    want.append(whole.normal((4,)))
    got, states = [], []
    for lo, hi in ((0, 3), (3, 5)):
        gen = random.generator(backend, 7)
        part = random.RowSlice(gen, 5, lo, hi)
        draws = [part.integers(0, 9, (hi - lo,)), part.uniform((hi - lo, 2))]
        draws += [part.bernoulli(0.5, (hi - lo,)), part.normal((4,))]
        for a in draws:
            assert backend.owns(a)
        got.append([to_numpy(a) for a in draws])
        states.append(json.dumps(gen.state()))
    for i in range(3):
        np.testing.assert_array_equal(np.concatenate([got[0][i], got[1][i]]), to_numpy(want[i]))
    for g in got:  # not per sample: every rank draws the same
        np.testing.assert_array_equal(g[3], to_numpy(want[3]))
    assert states[0] == states[1] == json.dumps(whole.state())


def test_a_state_of_another_kind_is_refused():
    with pytest.raises(ValueError, match="expected a 'numpy' state"):
        random.generator("cpu").set_state({"kind": "jax", "key": [0, 1]})
    with pytest.raises(ValueError, match="malformed"):
        random.generator("cpu").set_state({"kind": "numpy", "bit_generator": 3})
    with pytest.raises(ValueError, match="non-negative integer"):
        random.generator("cpu", -1)


def test_current_is_the_installed_generator_or_the_default():
    gen = random.generator("cpu", 3)
    assert random.current("cpu") is random.default("cpu")
    with random.using(gen):
        assert random.current("cpu") is gen
        with pytest.raises(ValueError, match="draws on cpu, the layer runs on strict:cpu"):
            random.current("strict:cpu")
    assert random.current("cpu") is random.default("cpu")
    random.manual_seed(4)
    try:
        a = to_numpy(random.default("cpu").uniform((3,)))
        random.manual_seed(4)
        np.testing.assert_array_equal(to_numpy(random.default("cpu").uniform((3,))), a)
    finally:
        random.manual_seed(0)


def test_backends_get_their_own_generator_and_others_the_host_fallback():
    assert type(random.generator("cpu")).__name__ == "NumpyGenerator"
    assert type(random.generator("strict:device1")).__name__ == "HostGenerator"
    for spec, kind in (("torch:cpu", "TorchGenerator"), ("jax:cpu", "JaxGenerator")):
        try:
            assert type(random.generator(spec)).__name__ == kind
        except BackendUnavailable:
            pass


# --- augmentation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("crop+flip", augment.Augment(2, True)),
        ("crop4", augment.Augment(4, False)),
        ("FLIP", augment.Augment(0, True)),
        ("flip+crop3", augment.Augment(3, True)),
        ("none", augment.Augment()),
        (None, augment.Augment()),
        ({"crop": 1, "flip": True}, augment.Augment(1, True)),
    ],
    ids=["crop+flip", "crop4", "FLIP", "flip+crop3", "none", "None", "dict"],
)
def test_parse(spec, expected):
    got = augment.parse(spec)
    assert got == expected
    assert augment.parse(got.spec) == got


@pytest.mark.parametrize("spec", ["rotate", "crop-2", "crop+", {"zoom": 2}, 3])
def test_parse_refuses_unknown_specs(spec):
    with pytest.raises(ValueError, match="augment"):
        augment.parse(spec)


def _expected(x, dy, dx, flips, p):
    """The augmented batch, one image at a time, from the definition."""
    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    out = np.empty_like(x)
    for i in range(n):
        window = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = window[:, :, ::-1] if flips[i] else window
    return out


@pytest.mark.parametrize("spec", ["crop2+flip", "crop3", "flip"])
def test_augment_equals_a_per_image_loop(backend, rng, spec):
    """Same seed, same draws in the same order (crop offsets, then flips): the gather on the
    device equals cropping and flipping each image by hand."""
    aug = augment.parse(spec)
    x = rng.random((9, 2, 6, 5)).astype(np.float32)
    got = aug(backend.asarray(x, "float32"), random.generator(backend, 11))
    assert backend.owns(got) and got.dtype == backend.dtype("float32")
    replay = random.generator(backend, 11)
    n, p = x.shape[0], aug.crop
    if p:
        dy = to_numpy(replay.integers(0, 2 * p + 1, (n,)))
        dx = to_numpy(replay.integers(0, 2 * p + 1, (n,)))
    else:
        dy = dx = np.zeros(n, dtype=np.int64)
    flips = to_numpy(replay.bernoulli(0.5, (n,))) if aug.flip else np.zeros(n, bool)
    expected = _expected(x, dy, dx, flips, p)
    np.testing.assert_array_equal(to_numpy(got), expected)
    if p:  # the draws did something: the test is not vacuous
        assert len(set(dy.tolist())) > 1
    assert not np.array_equal(expected, x)


def test_no_augmentation_is_the_identity(rng):
    x = rng.random((2, 1, 4, 4))
    assert augment.Augment()(x, random.generator("cpu")) is x


# --- the compiled JAX step: the key goes in and comes out -----------------------------------------


def _dropout_net(dtype, device):
    return nn.Sequential(
        {
            "conv": nn.Conv2d(1, 3, 3, padding=1, seed=1),
            "bn": nn.BatchNorm2d(3),
            "relu": nn.ReLU(),
            "pool": nn.MaxPool2d(2),
            "flatten": nn.Flatten(),
            "drop": nn.Dropout(0.4),
            "fc": nn.Linear(27, 4, seed=2),
        },
        dtype=dtype,
    ).to(device)


def _steps(device, compile, seed=3):
    backend = get_backend(device)
    model = _dropout_net("float64", device)
    gen = random.generator(backend, seed)
    step = TrainStep(
        model, optim.SGD(model.parameters(), lr=0.1, momentum=0.9), compile=compile, generator=gen
    )
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = backend.asarray(rng.random((5, 1, 6, 6)), "float64")
        step(x, backend.asarray(rng.integers(0, 4, 5), "int64"), 0.1)
    return model.state_dict(), gen.state(), step


def test_jitted_step_with_dropout_equals_the_eager_step():
    """jax.jit of the whole step takes the key and returns the advanced one: three compiled
    steps with dropout give the weights, batch-norm statistics and key of three eager ones."""
    try:
        get_backend("jax:cpu")
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    eager, eager_key, _ = _steps("jax:cpu", False)
    jitted, jitted_key, step = _steps("jax:cpu", True)
    assert step.compiled and jitted_key == eager_key
    assert eager_key != random.generator("jax:cpu", 3).state()  # the key did advance
    for k, v in eager.items():
        np.testing.assert_allclose(jitted[k], v, rtol=1e-12, atol=1e-14, err_msg=k)
    seeded = [_steps("cpu", False, seed=s)[0]["fc.weight"] for s in (3, 4)]
    assert not np.allclose(*seeded)  # dropout draws do change the weights: not a vacuous test


def test_stateful_generators_pass_no_key():
    _, _, step = _steps("cpu", False)
    params, buffers, opt_state = step.state()
    x, y = np.zeros((2, 1, 6, 6)), np.zeros(2, dtype=np.int64)
    *_, key = step.function(params, buffers, opt_state, x, y, 0.1, None)
    assert key is None
