"""Worker threads sharing a batch (xpcnn.workers): the one-thread math, on every CPU namespace."""

import threading

import numpy as np
import pytest

import xpcnn
from xpcnn import nn
from xpcnn import trainer as T
from xpcnn.backends import blas_threads, get_backend
from xpcnn.functional import cross_entropy
from xpcnn.step import TrainStep, predict_function
from xpcnn.workers import Workers, auto_count

from conftest import assert_close, ctrl_c_at_step


def _net(backend, dtype, dropout=0.0, batch_norm=False):
    """conv -> (batch norm) -> ReLU -> max pool -> flatten -> dropout -> linear: every kind of
    cache and a random draw."""
    layers = [nn.Conv2d(1, 4, 3, padding=1, dtype=dtype)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(4, dtype=dtype))
    layers += [
        nn.ReLU(dtype=dtype),
        nn.MaxPool2d(2, dtype=dtype),
        nn.Flatten(dtype=dtype),
        nn.Dropout(dropout, dtype=dtype),
        nn.Linear(4 * 14 * 14, 10, dtype=dtype),
    ]
    model = nn.Sequential(*layers, dtype=dtype)
    model.reset_parameters(3)
    return model.to(backend)


def _batch(backend, dtype, n, seed=0):
    rng = np.random.default_rng(seed)
    x = backend.asarray(rng.standard_normal((n, 1, 28, 28)), dtype)
    y = backend.asarray(rng.integers(0, 10, n), "int64")
    return x, y


def _steps(backend, dtype, workers, dropout=0.0, steps=3):
    """``steps`` SGD steps; also checks that the loss ran on worker threads when asked to."""
    model = _net(backend, dtype, dropout)
    opt = xpcnn.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    threads = set()

    def loss(logits, labels):
        threads.add(threading.current_thread().name)
        return cross_entropy(logits, labels)

    step = TrainStep(
        model, opt, loss, generator=xpcnn.random.generator(backend, 7), workers=workers
    )
    out = []
    for k in range(steps):
        x, y = _batch(backend, dtype, 50, seed=k)  # 50: uneven slices for 3 workers
        out.append(step(x, y, 0.1 * (1 - k / steps)))
    # the main thread is worker 0; the others ran on the pool's threads (which may hand two
    # slices to one thread when it is free first)
    on_workers = {t for t in threads if t.startswith("xpcnn-worker")}
    assert (len(on_workers) >= 1) == (workers > 1), threads
    return model, out


def _skip_unless_workers(backend):
    if not backend.worker_threads:
        with pytest.raises(ValueError, match="workers=2.*cannot split a batch between threads"):
            Workers(_net(backend, "float32"), 2)
        pytest.skip(f"{backend.name} refuses workers (tested just now)")


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("dropout", [0.0, 0.5], ids=["plain", "dropout"])
def test_steps_with_workers_equal_one_thread(backend64, workers, dropout):
    """Three SGD-momentum steps (lr falling) with 2 or 3 workers, uneven slices, with and
    without dropout: the one-thread weights, loss and count to float64 rounding, each array of
    the backend's namespace, device and dtype."""
    _skip_unless_workers(backend64)
    one, one_out = _steps(backend64, "float64", 1, dropout)
    many, many_out = _steps(backend64, "float64", workers, dropout)
    for (name, a), (_, b) in zip(many.named_parameters(), one.named_parameters(), strict=True):
        assert_close(a.data, b.data, "float64", name, backend=backend64)
    for (loss, correct), (loss1, correct1) in zip(many_out, one_out, strict=True):
        assert_close(loss, loss1, "float64", "loss", backend=backend64)
        assert float(correct) == float(correct1)


def test_float32_steps_with_workers_stay_float32(backend_dtype):
    backend, dtype = backend_dtype
    _skip_unless_workers(backend)
    one, _ = _steps(backend, dtype, 1)
    many, (*_, last) = _steps(backend, dtype, 2)
    assert last[0].dtype == backend.dtype(dtype)
    for (name, a), (_, b) in zip(many.named_parameters(), one.named_parameters(), strict=True):
        assert_close(a.data, b.data, dtype, name, backend=backend)


@pytest.mark.parametrize("workers", [2, 3])
def test_forward_with_workers_equals_the_model(backend_dtype, workers):
    """Eval-mode forward of 300 images (chunked inside each worker, uneven slices)."""
    backend, dtype = backend_dtype
    _skip_unless_workers(backend)
    model = _net(backend, dtype).eval()
    x, _ = _batch(backend, dtype, 300)
    pool = Workers(model, workers)
    assert_close(pool.forward(x), model.forward(x), dtype, "logits", backend=backend)
    pool.close()


def test_workers_compute_with_the_current_weights():
    backend = get_backend("cpu")
    model = _net(backend, "float64").eval()
    pool = Workers(model, 2)
    x, _ = _batch(backend, "float64", 40)
    before = pool.forward(x)
    model.load_state_dict({k: v * 2 for k, v in model.state_dict().items()})
    after = pool.forward(x)
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, model.forward(x), rtol=1e-12, atol=1e-12)


def test_training_mode_forward_is_the_models_own():
    """A training-mode forward (dropout draws, caches for backward) runs on the model whole:
    the numbers one thread draws, and a backward over the whole batch works after it."""
    backend = get_backend("cpu")
    model = _net(backend, "float64", dropout=0.5)
    pool = Workers(model, 2)
    x, _ = _batch(backend, "float64", 64)
    with xpcnn.random.using(xpcnn.random.generator(backend, 5)):
        shared = pool.forward(x)
    with xpcnn.random.using(xpcnn.random.generator(backend, 5)):
        alone = model.forward(x)
    np.testing.assert_array_equal(shared, alone)
    model.backward(np.ones_like(alone))


def test_auto_count(monkeypatch):
    backend = get_backend("cpu")
    monkeypatch.setattr(type(backend), "default_workers", lambda self: 4)
    assert auto_count(_net(backend, "float64", batch_norm=True), 128) == 1  # batch norm
    assert auto_count(_net(backend, "float64"), 128) == 4
    assert auto_count(_net(backend, "float64"), 96) == 3  # at least 32 images per worker
    assert auto_count(_net(backend, "float64"), 40) == 1


def test_replicas_follow_the_models_settings():
    """Settings changed after the workers were made (a dropout rate, ``.to()`` another
    backend or dtype) reach the replicas before the next call."""
    backend = get_backend("cpu")
    model = _net(backend, "float64", dropout=0.5)
    opt = xpcnn.optim.SGD(model.parameters(), lr=0.1)
    step = TrainStep(model, opt, generator=xpcnn.random.generator(backend, 1), workers=2)
    reference = _net(backend, "float64", dropout=0.5)
    ref_step = TrainStep(
        reference,
        xpcnn.optim.SGD(reference.parameters(), lr=0.1),
        generator=xpcnn.random.generator(backend, 1),
    )
    x, y = _batch(backend, "float64", 64)
    for m in (model, reference):
        m[4].p = 0.25  # the Dropout layer
    step(x, y, 0.1)
    ref_step(x, y, 0.1)
    pairs = zip(model.named_parameters(), reference.named_parameters(), strict=True)
    for (name, a), (_, b) in pairs:
        np.testing.assert_allclose(a.data, b.data, rtol=1e-12, atol=1e-14, err_msg=name)
    model.eval().to("strict:cpu")
    strict = get_backend("strict:cpu")
    xs = strict.asarray(np.asarray(x), "float64")
    pool = step.workers
    assert_close(pool.forward(xs), model.forward(xs), "float64", "logits", backend=strict)
    model.to(dtype="float32")
    x32 = strict.asarray(np.asarray(x), "float32")
    assert_close(pool.forward(x32), model.forward(x32), "float32", "logits", backend=strict)


def test_an_error_returns_only_after_every_worker_is_done():
    import threading
    import time

    backend = get_backend("cpu")
    pool = Workers(_net(backend, "float64"), 3)
    finished = []

    def job(i, lo, hi):
        if threading.current_thread() is threading.main_thread():
            raise RuntimeError("worker 0 failed")
        time.sleep(0.2)
        finished.append(i)

    with pytest.raises(RuntimeError, match="worker 0 failed"):
        pool._map(job, 30, 3)
    assert sorted(finished) == [1, 2]


def test_explicit_workers_with_batch_norm_say_what_changes(small):
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(2704, 10)
    )
    r = T.train(model, dataset=small, epochs=1, progress=False, workers=2)
    assert r.step.workers.count == 2
    assert any("batch norm normalises each worker's slice" in n for n in r.notes)
    r = T.train(model, dataset=small, epochs=1, progress=False)  # auto: one
    assert r.step.workers is None


def test_single_threaded_blas_inside_and_restored_after():
    from threadpoolctl import ThreadpoolController

    backend = get_backend("cpu")
    with ThreadpoolController().limit(limits=2, user_api="blas"):
        assert blas_threads() == 2
        with backend.single_threaded():
            assert blas_threads() == 1
        assert blas_threads() == 2


def _dropout_cnn():
    model = nn.Sequential(
        nn.Conv2d(1, 8, 2, stride=2, dtype="float64"),
        nn.ReLU(dtype="float64"),
        nn.Flatten(dtype="float64"),
        nn.Dropout(0.3, dtype="float64"),
        nn.Linear(8 * 14 * 14, 10, dtype="float64"),
        dtype="float64",
    )
    model.reset_parameters(0)
    return model


def test_train_with_workers_equals_one_thread_and_resumes_exactly(small, tmp_path, monkeypatch):
    """float64 training of a net with dropout, 2 workers: the one-worker weights to rounding;
    a Ctrl-C mid-epoch and a resume with workers left at auto (which here would mean one)
    keep the checkpoint's two and give the uninterrupted 2-worker run bit for bit."""
    kw = {"dataset": small, "epochs": 2, "batch_size": 64, "progress": False}
    two = T.train(_dropout_cnn(), workers=2, **kw)
    one = T.train(_dropout_cnn(), workers=1, **kw)
    assert two.step.workers.count == 2 and one.step.workers is None
    for k, v in one.model.state_dict().items():
        np.testing.assert_allclose(two.model.state_dict()[k], v, rtol=1e-10, atol=1e-12)
    path = tmp_path / "run.ckpt"
    with ctrl_c_at_step(monkeypatch, 5):  # epoch 2, step 2 (3 steps per epoch)
        with pytest.raises(T.TrainingInterrupted, match="epoch 2, step 2"):
            T.train(_dropout_cnn(), checkpoint=path, workers=2, **kw)
    monkeypatch.setattr(type(get_backend("cpu")), "default_workers", lambda self: 1)
    resumed = T.train(_dropout_cnn(), checkpoint=path, resume=True, **kw)
    assert resumed.step.workers.count == 2
    for k, v in two.model.state_dict().items():
        np.testing.assert_array_equal(resumed.model.state_dict()[k], v, err_msg=k)
    again = T.train(_dropout_cnn(), checkpoint=path, resume=True, workers=1, **kw)
    assert any("number of worker threads 2 -> 1" in n for n in again.notes)


def test_resume_elsewhere_or_from_an_older_checkpoint(small, tmp_path):
    """auto on another backend means that backend's default (JAX refuses workers, strict
    takes none unasked); a checkpoint from before workers were recorded counts as one."""
    from xpcnn import checkpoint as ckpt

    kw = {"dataset": small, "batch_size": 64, "progress": False}
    path = tmp_path / "run.ckpt"
    T.train(_dropout_cnn(), epochs=1, checkpoint=path, workers=2, **kw)
    for device in ("strict:cpu", "jax:cpu"):
        r = T.train(_dropout_cnn(), epochs=2, checkpoint=path, resume=True, device=device, **kw)
        assert r.step.workers is None
    arrays, meta = ckpt.load(path)
    del meta["run"]["workers"]
    ckpt.save(path, arrays, meta)
    r = T.train(_dropout_cnn(), epochs=2, checkpoint=path, resume=True, workers=2, **kw)
    assert any("number of worker threads 1 -> 2" in n for n in r.notes)


def test_auto_follows_the_blas_pool(small, monkeypatch):
    backend = get_backend("cpu")
    monkeypatch.setattr(type(backend), "default_workers", lambda self: 3)
    r = T.train(dataset=small, epochs=1, batch_size=96, progress=False)
    assert r.step.workers.count == 3
    monkeypatch.setattr(type(backend), "default_workers", lambda self: 1)
    assert T.train(dataset=small, epochs=1, progress=False).step.workers is None
    r = T.train(dataset=small, epochs=1, progress=False, device="strict:cpu")
    assert r.step.workers is None  # only NumPy takes workers unasked


@pytest.mark.parametrize("bad", [0, -1, 1.5, "two", True, None])
def test_bad_workers_are_refused_by_name(small, bad):
    with pytest.raises(ValueError, match="workers must be a positive integer or 'auto'"):
        T.train(dataset=small, epochs=1, progress=False, workers=bad)
    with pytest.raises(ValueError, match="workers must be a positive integer or 'auto'"):
        T.evaluate(xpcnn.SimpleCNN(), small, workers=bad)


def test_evaluate_with_workers_matches_one(small):
    model = xpcnn.SimpleCNN(seed=1, dtype="float64")
    one = T.evaluate(model, small, workers=1)
    two = T.evaluate(model, small, workers=2, batch_size=50)
    assert two.count == one.count
    assert two.accuracy == one.accuracy
    assert abs(two.loss - one.loss) < 1e-12


def test_command_line_workers(tmp_path, capsys):
    from xpcnn.cli import main

    assert main(["train", "--epochs", "1", "--no-progress", "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err
    from xpcnn import checkpoint

    ckpt = tmp_path / "w.ckpt"
    args = ["train", "--epochs", "1", "--no-progress", "--workers", "2", "--checkpoint", str(ckpt)]
    assert main(args) == 0
    assert checkpoint.load(ckpt)[1]["run"]["workers"] == 2
    assert main(["evaluate", str(ckpt), "--workers", "2"]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_mpi_jobs_take_no_workers(small):
    """In an MPI job (here a one-rank world) auto means one worker and more are refused."""
    mpi = pytest.importorskip("mpi4py.MPI")
    kw = {"dataset": small, "epochs": 1, "progress": False, "distributed": mpi.COMM_SELF}
    with pytest.raises(ValueError, match="workers=2 in an MPI job"):
        T.train(workers=2, **kw)
    assert T.train(**kw).step.workers is None


def test_predict_function_with_workers(backend_dtype):
    backend, dtype = backend_dtype
    _skip_unless_workers(backend)
    model = _net(backend, dtype)
    x, _ = _batch(backend, dtype, 100)
    predict = predict_function(model, workers=2)
    assert predict.workers.count == 2
    assert_close(predict(x), model.eval().forward(x), dtype, "logits", backend=backend)
    # compile does nothing on these backends: it combines with workers
    assert predict_function(model, compile=True, workers=2).workers.count == 2


def test_predict_function_refuses_workers_with_a_compiler():
    jax_backend = get_backend("jax:cpu")
    model = _net(jax_backend, "float32")
    with pytest.raises(ValueError, match="compile on jax:cpu and workers=2 do not combine"):
        predict_function(model, compile=True, workers=2)
    assert not hasattr(predict_function(model, compile=True, workers="auto"), "workers")


@pytest.mark.parametrize("bad", [True, 1.0, 0, "auto"])
def test_train_step_refuses_bad_workers(bad):
    model = _net(get_backend("cpu"), "float32")
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        TrainStep(model, xpcnn.optim.SGD(model.parameters(), lr=0.1), workers=bad)


class _HoldsNamespace(nn.Module):
    """Keeps the namespace module as an attribute (which cannot be deep-copied) and a dict
    of settings read in forward."""

    def __init__(self, *, dtype="float32", device="cpu"):
        super().__init__(dtype=dtype, device=device)
        self.xp = self.backend.xp
        self.opts = {"scale": 1.0}

    def forward(self, x):
        return x * self.opts["scale"]

    def backward(self, grad_out, need_input_grad=True):
        return grad_out * self.opts["scale"]


class _KeepsStats(nn.Module):
    """Sets a tuple of arrays and a counter on itself in every forward, and scales by a plain
    (non-parameter) array."""

    def __init__(self, *, dtype="float32", device="cpu"):
        super().__init__(dtype=dtype, device=device)
        self.scale = self.backend.asarray(np.ones(10), dtype)
        self.calls = 0

    def forward(self, x):
        self.stats = (x[0, ...], x[-1, ...])
        self.calls += 1
        return x * self.scale

    def backward(self, grad_out, need_input_grad=True):
        return grad_out * self.scale


def _custom(dtype="float64"):
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, dtype=dtype),
        _HoldsNamespace(dtype=dtype),
        nn.Flatten(dtype=dtype),
        nn.Linear(4 * 28 * 28, 10, dtype=dtype),
        _KeepsStats(dtype=dtype),
        dtype=dtype,
    )
    model.reset_parameters(2)
    return model


@pytest.fixture
def made(monkeypatch):
    """A list that grows by one each time a `Workers` makes its replicas."""
    made = []
    real = Workers._replicate

    def counting(self):
        made.append(1)
        real(self)

    monkeypatch.setattr(Workers, "_replicate", counting)
    return made


def test_custom_layers_with_any_attributes(small, made):
    """Attributes that cannot be copied (a namespace module), that change in every forward
    (arrays, counters), or that change in place (a dict, a plain array): two workers follow the
    model and train what one does; replicas are made again only when an attribute of the
    model is reassigned."""
    kw = {"dataset": small, "epochs": 1, "batch_size": 64, "progress": False}
    results = []
    for workers in (1, 2):
        model = _custom()
        model[1].opts["scale"] = 0.5  # in place, before and after the workers exist
        model[4].scale[3] = 2.0
        r = T.train(model, workers=workers, **kw)
        results.append(r)
    for (name, a), (_, b) in zip(
        results[1].model.named_parameters(), results[0].model.named_parameters(), strict=True
    ):
        np.testing.assert_allclose(a.data, b.data, rtol=1e-10, atol=1e-12, err_msg=name)
    step = results[1].step
    model = step.model
    x, y = _batch(get_backend("cpu"), "float64", 64)
    model[1].opts["scale"] = 3.0  # in place: the replicas share the dict
    model[4].scale[:] = 0.25  # in place: they share the array
    model.eval()
    np.testing.assert_allclose(step.workers.forward(x), model.forward(x), rtol=1e-12, atol=1e-12)
    assert len(made) <= 1 + 3 + 1  # made, then once per step (calls/stats reassigned)...
    before = len(made)
    model.eval()
    step.workers.forward(x)
    assert len(made) == before + 1  # ... and once more: forward reassigned calls and stats


def test_the_callers_context_reaches_the_workers():
    """np.errstate (a context variable in NumPy 2) and `xpcnn.random.using` hold in the
    worker threads as in the caller."""
    backend = get_backend("cpu")
    pool = Workers(_net(backend, "float32"), 3)
    gen = xpcnn.random.generator(backend, 3)

    def job(i, lo, hi):
        return np.geterr()["over"], xpcnn.random.current(backend) is gen

    with np.errstate(over="raise"), xpcnn.random.using(gen):
        seen, _ = pool._map(job, 60, 3)
    assert seen == [("raise", True)] * 3


def test_default_training_makes_replicas_once(small, made):
    r = T.train(dataset=small, epochs=2, batch_size=64, progress=False, workers=2)
    assert r.step.workers.count == 2
    assert len(made) == 1
