"""scripts/gpu_check.py, run here with --cpu-smoke: the GPU check's code paths without a GPU."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
CONTENDERS = (
    "xpcnn-cupy",
    "xpcnn-cupy-plain",
    "xpcnn-torch",
    "xpcnn-torch-graph",
    "xpcnn-jax",
    "torch-nn",
)


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_prints_the_table_last_and_writes_json(tmp_path):
    pytest.importorskip("torch")
    env = dict(os.environ, OUT=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout.rstrip().split("gpu_check summary", 1)[1]
    assert table.rstrip().endswith("=" * 10)
    for label in ("xpcnn cpu", "xpcnn torch:cpu", "torch.nn cpu", "epoch time ratio"):
        assert label in table
    assert "status OK" in table

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "cpu-smoke" and report["status"] == "OK"
    assert set(report["stages"].values()) == {"ok"}
    assert report["tests"]["failed"] == report["tests"]["errors"] == 0
    assert report["tests"]["skipped"] > 0  # the GPU tests, skipped on this machine
    assert (tmp_path / "gpu_tests.log").exists()
    env_ = report["environment"]
    for key in ("card", "numpy", "xpcnn", "torch", "CUPY_TF32", "torch_matmul_allow_tf32"):
        assert key in env_

    bench = report["benchmark"]
    assert set(bench["contenders"]) == set(CONTENDERS) and not bench["errors"]
    losses = []
    for entry in bench["contenders"].values():
        assert entry["timed_epochs"] == 1 and entry["epoch_s_median"] > 0
        assert entry["host_syncs_per_epoch"] >= 1
        losses.append([r["train_loss"] for r in entry["rounds"]])
    # same initial weights and batch order: the three trainings agree
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert losses[0] == pytest.approx(losses[2], rel=1e-4)
    assert set(bench["ratios"]) == {f"{k}/torch-nn" for k in CONTENDERS if k != "torch-nn"}
    for key in CONTENDERS:
        assert report["inference"]["results"][key]["images_per_s"] > 0
    assert 0 <= report["accuracy"]["test_accuracy"] <= 1
    assert report["table"] in proc.stdout


def test_a_crashed_stage_is_reported_and_the_rest_still_runs(gpu_check, monkeypatch, tmp_path):
    pytest.importorskip("torch")

    def broken(cfg, budget):
        raise RuntimeError("no GPU today")

    monkeypatch.setattr(gpu_check, "run_benchmark", broken)
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.main(["--cpu-smoke", "--skip-tests"]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["stages"]["benchmark"].startswith("CRASHED: RuntimeError: no GPU today")
    assert report["stages"]["accuracy"] == "ok"
    assert "status FAILED (benchmark)" in report["table"]


@pytest.mark.parametrize(
    "text, expected, complete",
    [
        ("... [100%]\n3 failed, 250 passed, 5 skipped, 1 error in 61.20s\n", (250, 3, 5, 1), True),
        ("== 258 skipped, 737 deselected in 2.11s ==", (0, 0, 258, 0), True),
        ("==== 12 passed, 2 warnings in 0.50s ====\n", (12, 0, 0, 0), True),
        # killed by the timeout: no summary, count the -q progress characters
        ("collected\n..F.s [ 40%]\n..E\n", (5, 1, 1, 1), False),
    ],
)
def test_parse_pytest_summary(gpu_check, text, expected, complete):
    counts, found = gpu_check.parse_pytest_summary(text)
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["errors"]) == expected
    assert found == complete


def test_tests_must_pass_and_run_on_the_gpu(gpu_check):
    ok = {"passed": 5, "failed": 0, "skipped": 0, "errors": 0, "returncode": 0, "timed_out": False}
    assert gpu_check.tests_ok(ok, gpu_check.GPU)
    assert not gpu_check.tests_ok(dict(ok, failed=1, returncode=1), gpu_check.GPU)
    assert not gpu_check.tests_ok(dict(ok, timed_out=True, returncode=None), gpu_check.GPU)
    assert not gpu_check.tests_ok(dict(ok, passed=0, returncode=5), gpu_check.GPU)
    assert gpu_check.tests_ok(dict(ok, passed=0, skipped=9), gpu_check.CPU_SMOKE)


def test_too_slow_epochs_are_stopped_and_extrapolated(gpu_check):
    pytest.importorskip("torch")
    result, _, _, _ = gpu_check.run_benchmark(gpu_check.CPU_SMOKE, budget_s=0.01)
    assert "reduced to 0 timed epoch(s)" in result["note"]
    for entry in result["contenders"].values():
        (warmup,) = entry["rounds"]
        assert warmup["fraction"] == 0.25  # one step of four, then the deadline
        assert entry["extrapolated"] and entry["timed_epochs"] == 0
        assert entry["epoch_s_median"] == warmup["seconds"] > 0
