"""Data-parallel training over MPI (xpcnn.distributed).

The first tests run in this process and never import mpi4py: detection, slicing, the model,
the command line's quiet ranks. The rest launch ``mpiexec -n 2`` (tests/mpi_worker.py) on the
CPU, each under a time limit: 2 ranks equal 1 process (NumPy, torch, JAX compiled), exact resume
after a stop that one rank alone asked for, a failing or killed rank ends the job, SIGUSR1
through mpiexec stops with a checkpoint. They skip, with the reason, without mpi4py or mpiexec
(``pip install 'xpcnn[mpi]'`` brings both); CI sets ``XPCNN_REQUIRE_MPI=1`` to fail instead.
"""

import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from xpcnn import augment, cli, nn, optim
from xpcnn import backends as B
from xpcnn import checkpoint as ckpt
from xpcnn import distributed as D
from xpcnn import trainer as T

import mpi_worker
from conftest import max_rel_err
from mpi_worker import CONFIGS, GPU_CONFIG, JAX_CONFIGS, run_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "mpi_worker.py"
LAUNCH_VARS = [v for pair in D.LAUNCH_VARIABLES for v in pair]


@pytest.fixture
def no_launch(monkeypatch):
    """This process as if started without mpiexec."""
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(D, "_world", None)


# --- without MPI ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4"}, (3, 4)),
        ({"PMI_RANK": "1", "PMI_SIZE": "2"}, (1, 2)),  # MPICH / Intel MPI (Hydra)
        ({"PMIX_RANK": "0"}, (0, None)),  # PMIx without a size: mpi4py will say
        ({"PMIX_RANK": "5", "SLURM_STEP_NUM_TASKS": "8"}, (5, 8)),  # srun --mpi=pmix
        ({"SLURM_NTASKS": "8"}, None),  # an allocation is not a launch
        ({"PMI_RANK": "x"}, None),
    ],
)
def test_detect_reads_the_launchers_variables(env, expected):
    launch = D.detect(env)
    assert (None if launch is None else (launch.rank, launch.size)) == expected


def test_shard_splits_as_evenly_as_possible():
    for count in (0, 1, 45, 128, 301):
        for parts in (1, 2, 3, 7):
            pieces = [D.shard(count, parts, r) for r in range(parts)]
            assert pieces[0][0] == 0 and pieces[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:], strict=False))
            sizes = [hi - lo for lo, hi in pieces]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert [D.shard(45, 2, r) for r in (0, 1)] == [(0, 23), (23, 45)]
    assert D.shard(1, 2, 1) == (1, 1)  # a rank may get nothing of a tiny last batch


def test_ring_allreduce_model():
    n, bw = 2.2e6, 25e9 / 8
    assert D.ring_allreduce_seconds(n, 1, bw, 30e-6) == 0.0
    assert D.ring_allreduce_seconds(n, 2, bw, 0.0) == pytest.approx(n / bw)
    assert D.ring_allreduce_seconds(n, 2, 1e30, 30e-6) == pytest.approx(2 * 30e-6)
    # the bandwidth term tends to 2n/B, the latency term grows linearly
    t512 = D.ring_allreduce_seconds(n, 512, bw, 30e-6)
    assert t512 == pytest.approx(2 * 511 / 512 * n / bw + 2 * 511 * 30e-6)
    assert D.step_seconds(64, 0.002, 0.0005) == pytest.approx(0.034)


def test_training_alone_never_imports_mpi4py(no_launch):
    before = "mpi4py" in sys.modules
    r = run_config("alone", ("cpu", "float32", "sgd", 64))
    assert len(r.history) == 2 and not any("data-parallel" in n for n in r.notes)
    if not before:
        assert "mpi4py" not in sys.modules


def test_distributed_true_without_mpiexec_is_refused(no_launch):
    with pytest.raises(D.DistributedError, match=r"not started by an MPI launcher.*mpiexec -n N"):
        T.train(distributed=True)
    with pytest.raises(ValueError, match="unknown allreduce transport 'gloo'"):
        T.train(distributed="gloo")
    with pytest.raises(ValueError, match="distributed must be None, True, False"):
        T.train(distributed=3)


def test_one_rank_launch_trains_alone(no_launch, monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")
    assert D.setup(None) is None


def test_missing_mpi4py_under_mpiexec_says_what_to_install(no_launch, monkeypatch):
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import fails
    with pytest.raises(D.DistributedError, match=r"PMI_RANK=0.*pip install 'xpcnn\[mpi\]'"):
        D.setup(None)


class _FakeComm:
    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Allreduce(self, *args):
        raise AssertionError("not expected")

    def allgather(self, value):  # rank 1 of 2 built its run on another dataset
        other = dict(value, dataset=dict(value["dataset"], name="elsewhere"))
        return [value, other]


class _OtherSchedule(_FakeComm):
    def allgather(self, value):  # rank 1 of 2 was given another schedule
        return [value, dict(value, **{"learning-rate schedule": "constant"})]


def test_ranks_that_built_different_runs_are_refused():
    world = D.World(_FakeComm(0, 2), local_rank=0, local_size=2)
    model = nn.SimpleCNN()
    run = types.SimpleNamespace(
        dataset_id=T.dataset_identity(mpi_worker.subset(64)), batch_size=32, epochs=1,
        start_epoch=0, start_step=0, seed=0, model=model,
        optimizer=optim.SGD(model.parameters(), lr=0.1), schedule_name="cosine",
        augment=augment.parse(None),
    )  # fmt: skip
    with pytest.raises(D.DistributedError, match=r"rank 1 differs from rank 0 in its dataset"):
        world.check_same_run(run)
    world = D.World(_OtherSchedule(0, 2), local_rank=0, local_size=2)
    with pytest.raises(D.DistributedError, match=r"in its learning-rate schedule: 'constant'"):
        world.check_same_run(run)


def test_gpu_is_picked_by_local_rank(monkeypatch):
    monkeypatch.setattr(D, "_gpu_count", lambda family: 2)
    world = D.World(_FakeComm(3, 4), local_rank=3, local_size=4)
    assert world.device_for("cuda") == "cuda:1"  # 4 ranks share 2 GPUs
    assert world.device_for("torch:cuda") == "torch:cuda:1"
    assert world.device_for("cuda:0") == "cuda:0"  # named by the user: kept
    assert world.device_for("cpu") == "cpu"
    monkeypatch.setattr(D, "_gpu_count", lambda family: 0)  # unknown: the backend will say
    assert world.device_for("cuda") == "cuda:3"


@pytest.mark.parametrize("rank, prints", [("0", True), ("1", False)])
def test_command_line_prints_on_rank_0_only(no_launch, monkeypatch, capsys, rank, prints):
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", rank)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert cli.main(["train", "--epochs", "0"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert ("expected a positive integer" in err) == prints


# --- under mpiexec --------------------------------------------------------------------------------


def _mpiexec():
    """``[mpiexec, options...]`` for 2 ranks on this machine, or skip/fail with the reason."""
    reason = None
    if importlib.util.find_spec("mpi4py") is None:
        reason = "mpi4py is not installed (pip install 'xpcnn[mpi]')"
    exe = shutil.which("mpiexec") or shutil.which("mpiexec", path=os.path.dirname(sys.executable))
    if reason is None and exe is None:
        reason = "no mpiexec on PATH (pip install 'xpcnn[mpi]' brings Open MPI's)"
    if reason:
        if os.environ.get("XPCNN_REQUIRE_MPI"):
            pytest.fail(f"XPCNN_REQUIRE_MPI is set but {reason}")
        pytest.skip(reason)
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    cmd = [exe, "-n", "2"]
    if "Open MPI" in version.stdout + version.stderr:  # more ranks than cores; root in CI
        cmd += ["--oversubscribe", "--allow-run-as-root", "--bind-to", "none"]
    return cmd


def _env():
    env = dict(os.environ)
    for var in LAUNCH_VARS:
        env.pop(var, None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    return env


def _stop(proc):
    """End a launch that overran: mpiexec kills its ranks on SIGTERM (a SIGKILL would orphan
    them)."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _launch(args, out, timeout, env=None):
    """Run ``mpiexec -n 2 args`` with stdout/stderr in files under ``out``; returns
    (returncode, stdout, stderr, seconds). Fails the test if it overruns ``timeout``."""
    out.mkdir(parents=True, exist_ok=True)
    stdout, stderr = open(out / "stdout", "w"), open(out / "stderr", "w")
    t0 = time.perf_counter()
    with stdout, stderr:
        cmd = _mpiexec() + [str(a) for a in args]
        env = _env() if env is None else env
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env, cwd=out)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            pytest.fail(
                f"mpiexec {args} did not finish in {timeout} s: {(out / 'stderr').read_text()}"
            )
    return (
        proc.returncode,
        (out / "stdout").read_text(),
        (out / "stderr").read_text(),
        time.perf_counter() - t0,
    )


def _weights(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _assert_ranks_identical(out, name):
    w0, w1 = _weights(out / f"{name}-rank0.npz"), _weights(out / f"{name}-rank1.npz")
    for k in w0:
        np.testing.assert_array_equal(w1[k], w0[k], err_msg=f"{name}: ranks differ in {k}")
    return w0


def _equivalence(out, jax=False):
    args = [sys.executable, WORKER, "equivalence", out] + (["--jax"] if jax else [])
    rc, stdout, stderr, _ = _launch(args, out, timeout=300)
    assert rc == 0, stderr
    return out, stdout


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    return _equivalence(tmp_path_factory.mktemp("equivalence"))


@pytest.fixture(scope="module")
def equivalence_jax(tmp_path_factory):
    pytest.importorskip("jax")
    return _equivalence(tmp_path_factory.mktemp("equivalence-jax"), jax=True)


@pytest.mark.parametrize("name", CONFIGS)
def test_two_ranks_equal_one_process(name, equivalence, no_launch):
    """2 ranks x global batch 128 give the weights of 1 process at batch 128 (2 epochs, uneven
    and empty slices in the last batch): float64 to 1e-12, float32 within rounding."""
    _check_equivalence(name, CONFIGS[name], *equivalence)


@pytest.mark.slow
@pytest.mark.parametrize("name", JAX_CONFIGS)
def test_two_ranks_with_compiled_jax_halves_equal_one_numpy_process(
    name, equivalence_jax, no_launch
):
    """The jitted halves of the step with the allreduce between them (jax:cpu, float64) give
    the weights of one NumPy process, to 1e-12 (tracing and compiling take most of the time)."""
    _check_equivalence(name, JAX_CONFIGS[name], *equivalence_jax)


def _check_equivalence(name, config, out, stdout):
    got = _assert_ranks_identical(out, name)
    if name in JAX_CONFIGS:  # the compiled halves against NumPy's eager step
        config = ("cpu", *config[1:])
    ref = run_config(name, config, distributed=False)
    bound = 1e-12 if config[1] == "float64" else 2e-5
    for k, v in ref.model.state_dict().items():
        assert max_rel_err(got[k], v) < bound, (k, max_rel_err(got[k], v))
    rows = json.loads((out / f"{name}-rank0.json").read_text())["history"]
    for row, want in zip(rows, ref.history, strict=True):
        assert row["train_loss"] == pytest.approx(want["train_loss"], rel=bound * 10)
        assert row["test_loss"] == pytest.approx(want["test_loss"], rel=bound * 10)
        assert row["test_accuracy"] == want["test_accuracy"]
    assert "data-parallel over 2 MPI ranks" in stdout
    notes = json.loads((out / f"{name}-rank0.json").read_text())["notes"]
    assert any("gradients via host" in n for n in notes)


def test_resume_with_two_ranks_is_exact(tmp_path, no_launch):
    """Rank 0 alone gets SIGINT mid-epoch: both ranks stop at the same step, rank 0 saves,
    and resuming on 2 ranks gives the uninterrupted 2-rank weights bit for bit; resuming the
    same checkpoint in one process gives them to rounding, with a note. A loss that becomes
    NaN on rank 1 alone stops both ranks at the same step with the same message."""
    rc, stdout, stderr, _ = _launch([sys.executable, WORKER, "resume", tmp_path], tmp_path, 120)
    assert rc == 0, stderr
    records = [json.loads((tmp_path / f"interrupted-rank{r}.json").read_text()) for r in (0, 1)]
    for rec in records:
        assert "interrupted at epoch 2, step 2" in rec["message"], records
    full = _assert_ranks_identical(tmp_path, "full")
    resumed = _assert_ranks_identical(tmp_path, "resumed")
    for k, v in full.items():
        np.testing.assert_array_equal(resumed[k], v, err_msg=k)
    _, meta = ckpt.load(tmp_path / "interrupted.ckpt")
    assert (meta["epoch"], meta["step"], meta["run"]["world_size"]) == (1, 2, 2)
    alone = run_config(
        "alone", CONFIGS["cpu-float32-sgd"], checkpoint=tmp_path / "interrupted.ckpt",
        resume=True, distributed=False,
    )  # fmt: skip
    assert any("number of MPI ranks 2 -> 1" in n for n in alone.notes)
    for k, v in alone.model.state_dict().items():
        assert max_rel_err(v, full[k]) < 2e-5, k
    diverged = [json.loads((tmp_path / f"diverged-rank{r}.json").read_text()) for r in (0, 1)]
    assert diverged[0] == diverged[1]
    assert "loss became non-finite at epoch 2, step 1 of 3" in diverged[0]["message"]
    assert stderr.strip() == "", stderr


def test_a_failing_rank_stops_the_job_with_one_message(tmp_path):
    """A rank that cannot start: it raises its own error, the other a DistributedError naming
    it (no hang). A rank that raises while training: one line, MPI_Abort, the job ends."""
    rc, stdout, stderr, seconds = _launch([sys.executable, WORKER, "fail", tmp_path], tmp_path, 60)
    start = [json.loads((tmp_path / f"start-rank{r}.json").read_text()) for r in (0, 1)]
    assert start[1]["type"] == "ValueError" and "no-such-device" in start[1]["message"]
    assert start[0]["type"] == "DistributedError"
    assert start[0]["message"].startswith("rank 1 failed to start: ValueError: unknown device")
    assert rc != 0
    assert stderr.count("xpcnn: rank 1 of 2: error: RuntimeError: injected failure") == 1, stderr
    assert "rank 0 of 2" not in stderr
    assert not list(tmp_path.glob("fail-finished-*"))


def test_a_rank_that_cannot_load_its_data_on_the_command_line_stops_the_job(tmp_path):
    """`xpcnn train` loads the dataset and builds the model before training: one rank failing
    there ends every rank with one message from rank 0, instead of a silent hang."""
    code = (
        "import os, sys; from xpcnn.cli import main; "
        "rank = os.environ.get('OMPI_COMM_WORLD_RANK', os.environ.get('PMI_RANK', '0')); "
        "data = 'mnist-5k' if rank == '0' else '/nonexistent-dataset'; "
        "sys.exit(main(['train', '--epochs', '1', '--no-progress', '--dataset', data]))"
    )
    rc, stdout, stderr, seconds = _launch([sys.executable, "-c", code], tmp_path, 60)
    assert rc != 0
    message = "xpcnn: error: rank 1 failed to start: DatasetNotFound: '/nonexistent-dataset'"
    assert stderr.count(message) == 1, stderr
    assert seconds < 30


def test_a_killed_rank_ends_the_job_instead_of_hanging(tmp_path):
    args = _mpiexec() + [sys.executable, str(WORKER), "long", str(tmp_path)]
    proc = subprocess.Popen(
        args, env=_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        pid_file = tmp_path / "pid-rank1"
        while not pid_file.exists() or not pid_file.read_text():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "training did not start in 60 s"
            time.sleep(0.1)
        t0 = time.monotonic()
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        rc = proc.wait(30)
        assert time.monotonic() - t0 < 15
        assert rc != 0
    finally:
        if proc.poll() is None:
            _stop(proc)
        proc.stderr.close()


def test_sigusr1_to_mpiexec_stops_every_rank_with_a_checkpoint(tmp_path):
    """Open MPI forwards SIGUSR1 to the ranks (Ctrl-C makes it kill them): they agree to stop
    at the same step, rank 0 saves and prints one message, and the command exits with 130."""
    path = tmp_path / "run.ckpt"
    args = _mpiexec() + [
        sys.executable, "-m", "xpcnn.cli", "train", "--epochs", "20", "--no-progress",
        "--checkpoint", str(path), "--batch-size", "64",
    ]  # fmt: skip
    out, err = open(tmp_path / "stdout", "w+"), open(tmp_path / "stderr", "w+")
    with out, err:
        proc = subprocess.Popen(args, env=_env(), cwd=tmp_path, stdout=out, stderr=err)
        try:
            deadline = time.monotonic() + 60
            while "note: data-parallel" not in (tmp_path / "stdout").read_text():
                assert proc.poll() is None, (tmp_path / "stderr").read_text()
                assert time.monotonic() < deadline, "training did not start in 60 s"
                time.sleep(0.1)
            time.sleep(1.0)
            proc.send_signal(signal.SIGUSR1)
            rc = proc.wait(30)
        finally:
            if proc.poll() is None:
                _stop(proc)
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert rc == cli.EXIT_INTERRUPTED, stderr
    assert stderr.count("xpcnn: interrupted at epoch") == 1, stderr
    assert stdout.count("note: data-parallel over 2 MPI ranks") == 1
    _, meta = ckpt.load(path)
    assert meta["run"]["world_size"] == 2 and meta["epoch"] < 20


# --- on a GPU -------------------------------------------------------------------------------------

GPU_DEVICES = ["cuda", "torch:cuda", "jax:cuda"]


@pytest.mark.gpu
def test_two_ranks_sharing_one_gpu_train_like_one_process(tmp_path, no_launch):
    """``mpiexec -n 2`` with ``--device cuda`` (no index): each rank takes GPU (local rank %
    GPUs), so on a one-GPU machine both share it; gradients go through host memory unless the
    MPI library is CUDA-aware. Both ranks end with identical weights, equal to one process on
    the same GPU to float32 rounding. CuPy, torch CUDA (compiled halves: CUDA graphs) and JAX
    (jitted halves), whichever are installed."""
    devices = []
    for spec in GPU_DEVICES:
        try:
            B.get_backend(f"{spec}:0")
            devices.append(spec)
        except (B.BackendUnavailable, ValueError):
            pass
    if not devices:
        pytest.skip("no CUDA backend (CuPy, torch CUDA or JAX CUDA) is available")
    args = [sys.executable, WORKER, "gpu", tmp_path, *devices]
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    rc, stdout, stderr, seconds = _launch(args, tmp_path, 400, env=dict(_env(), **env))
    assert rc == 0, stderr
    print(f"devices {devices}: 2 ranks in {seconds:.0f} s\n{stdout}")
    for spec in devices:
        name = spec.replace(":", "-")
        got = _assert_ranks_identical(tmp_path, name)
        ref = run_config(name, (f"{spec}:0", *GPU_CONFIG), distributed=False)
        for k, v in ref.model.state_dict().items():
            assert max_rel_err(got[k], v) < 1e-3, (spec, k, max_rel_err(got[k], v))
        rows = json.loads((tmp_path / f"{name}-rank0.json").read_text())["history"]
        assert rows[-1]["train_loss"] < rows[0]["train_loss"]
        assert rows[-1]["test_accuracy"] == pytest.approx(
            ref.history[-1]["test_accuracy"], abs=0.02
        )
