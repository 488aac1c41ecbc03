"""One-call GPU check: the GPU tests, a training and inference benchmark, and an accuracy run.

    bash scripts/gpu_check.sh                 # on a lent GPU machine (see docs/gpu.md)
    python scripts/gpu_check.py --cpu-smoke   # the same code paths on the CPU, small and quick

Stages, each of which may fail without stopping the next: the environment (card, driver, CUDA,
versions, TF32 settings); ``pytest -m gpu`` with both GPU backends required; one training epoch
of 60000 28x28 images at batch 128 for xpcnn on CuPy, xpcnn on torch CUDA and PyTorch's own
nn.Module (same initial weights and batch order, SGD momentum 0.9, constant lr, median of
several epochs after a warm-up, host read-backs counted); inference throughput at batch 1000;
test accuracy of ``xpcnn.train(device="cuda:0")`` on the embedded digits. A summary table is
printed last, and with ``$OUT`` set the log, the test output and a JSON report go there.
Exit status 1 if a test failed or a stage crashed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if "--cpu-smoke" in sys.argv[1:]:  # one thread per pool: many threads crawl on a busy small CPU
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
if importlib.util.find_spec("xpcnn") is None:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import xpcnn  # noqa: E402
from xpcnn import datasets, kernels, trainer  # noqa: E402
from xpcnn.step import TrainStep, predict_function  # noqa: E402

SEED = 0
BATCH = 128
LR = 0.05
MOMENTUM = 0.9
INFER_BATCH = 1000

GPU = {
    "mode": "gpu",
    "xpcnn_cupy": "cuda:0",
    "xpcnn_torch": "torch:cuda:0",
    "xpcnn_jax": "jax:cuda:0",
    "torch_device": "cuda:0",
    "require": "cuda:0,torch:cuda:0,jax:cuda:0",
    "images": 60000,
    "rounds": 5,  # timed epochs per contender, fewer if the budget runs out (at least 3 fit)
    "bench_budget_s": 70,  # training epochs, warm-up included
    "infer_batches": 10,  # batches of 1000 per timed repeat
    "infer_repeats": 5,
    "accuracy_epochs": None,  # xpcnn.train's default
    "accuracy_subset": None,  # (train, test) image counts; None: the whole dataset
    "tests_timeout_s": 170,
    "test_workers": 8,  # pytest-xdist processes sharing the GPU, if xdist is installed
    "sync_probe_steps": 20,
}
CPU_SMOKE = dict(
    GPU,
    mode="cpu-smoke",
    xpcnn_cupy="cpu",
    xpcnn_torch="torch:cpu",
    xpcnn_jax="jax:cpu",
    torch_device="cpu",
    require="",
    images=512,
    rounds=1,
    bench_budget_s=60,
    infer_batches=1,
    infer_repeats=2,
    accuracy_epochs=1,
    accuracy_subset=(512, 200),
    test_workers=0,
    sync_probe_steps=4,
)
TOTAL_BUDGET_S = 290  # leaves room in a lent machine's run for scripts/gpu_check.sh's extras


def say(*args):
    print(*args, flush=True)


# --- environment -------------------------------------------------------------------------------


def _version(module):
    try:
        return __import__(module).__version__
    except ImportError:
        return "missing"


def _cuda_version(number):
    """13000 -> '13.0'."""
    return f"{number // 1000}.{number % 1000 // 10}"


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def environment(cfg):
    """Card, driver, CUDA runtime, library versions and the TF32 settings."""
    env = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "xpcnn": xpcnn.__version__,
        "array_api_compat": _version("array_api_compat"),
        "cupy": _version("cupy"),
        "torch": _version("torch"),
        "CUPY_TF32": os.environ.get("CUPY_TF32", "unset"),
        "CUPY_CACHE_DIR": os.environ.get("CUPY_CACHE_DIR", "unset (~/.cupy/kernel_cache)"),
    }
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        name, driver, memory = (s.strip() for s in out.stdout.splitlines()[0].split(","))
        env.update(card=name, driver=driver, memory=memory)
    except Exception as exc:
        env["nvidia_smi"] = f"unavailable ({type(exc).__name__})"
    try:
        import cupy

        rt = cupy.cuda.runtime
        env["cuda_runtime_cupy"] = _cuda_version(rt.runtimeGetVersion())
        env["cuda_driver_api"] = _cuda_version(rt.driverGetVersion())
        env.setdefault("card", rt.getDeviceProperties(0)["name"].decode())
    except Exception as exc:
        env["cupy_cuda"] = f"unavailable ({type(exc).__name__}: {exc})"[:200]
    try:
        import torch

        env["cuda_torch_built"] = torch.version.cuda or "none (CPU build)"
        env["torch_cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            env.setdefault("card", torch.cuda.get_device_name(0))
    except Exception as exc:
        env["torch_info"] = f"unavailable ({type(exc).__name__}: {exc})"[:200]
    else:
        flags = {
            "torch_matmul_allow_tf32": lambda: torch.backends.cuda.matmul.allow_tf32,
            "torch_cudnn_allow_tf32": lambda: torch.backends.cudnn.allow_tf32,
            "torch_matmul_fp32_precision": lambda: torch.backends.cuda.matmul.fp32_precision,
            "torch_float32_matmul_precision": torch.get_float32_matmul_precision,
        }
        for key, read in flags.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # newer torch deprecates allow_tf32
                try:
                    env[key] = read()
                except Exception as exc:
                    env[key] = f"unreadable ({type(exc).__name__})"
    if cfg["mode"] == "cpu-smoke":
        env["card"] = f"CPU: {_cpu_name()} (--cpu-smoke)"
    env.setdefault("card", "unknown")
    return env


# --- tests ----------------------------------------------------------------------------------------

COUNT_WORDS = {
    "passed": "passed",
    "failed": "failed",
    "skipped": "skipped",
    "error": "errors",
    "errors": "errors",
    "deselected": "deselected",
    "xfailed": "xfailed",
    "xpassed": "xpassed",
}
PROGRESS_CHARS = {".": "passed", "F": "failed", "E": "errors", "s": "skipped"}


def parse_pytest_summary(text):
    """Counts from pytest's last line, e.g. '3 failed, 250 passed, 5 skipped in 61.2s'.

    Without a summary line (a killed run), count the per-test lines of ``-v`` (``PASSED``,
    ``FAILED``, ...) or else the progress characters of ``-q`` instead.
    """
    counts = dict.fromkeys(["passed", "failed", "skipped", "errors"], 0)
    verbose = re.findall(r"\b(PASSED|FAILED|SKIPPED|ERROR) tests/", text)
    for line in reversed(text.strip().splitlines()):
        found = re.findall(
            r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", line
        )
        if found and re.search(r" in [\d.]+s", line):
            for number, word in found:
                counts[COUNT_WORDS[word]] = int(number)
            return counts, True
    if verbose:
        for word in verbose:
            counts[{"ERROR": "errors"}.get(word, word.lower())] += 1
        return counts, False
    for line in text.splitlines():
        if re.fullmatch(r"[.FEsxX]+\s*(\[\s*\d+%\])?", line.strip()):
            for ch in line.split("[")[0].strip():
                if ch in PROGRESS_CHARS:
                    counts[PROGRESS_CHARS[ch]] += 1
    return counts, False


def run_tests(cfg, out_dir):
    """``pytest -m gpu`` in a subprocess, with the GPU backends required (a skip fails)."""
    env = dict(os.environ, XPCNN_REQUIRE_BACKENDS=cfg["require"])
    # -v: each test's outcome is printed as it ends, so a run killed at its time limit still
    # names every failure so far in gpu_tests.log; the tracebacks come at the end (--tb=line)
    flags = "-m gpu -v -rfE --tb=line -p no:cacheprovider -p no:benchmark".split()
    workers = cfg.get("test_workers", 0)
    if workers and importlib.util.find_spec("xdist") is not None:
        flags += ["-n", str(workers)]
    cmd = [sys.executable, "-m", "pytest", *flags, str(ROOT / "tests")]
    say(f"$ XPCNN_REQUIRE_BACKENDS={cfg['require']} {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    timed_out = False
    try:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=cfg["tests_timeout_s"],
        )
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output = _text(exc.stdout) + _text(exc.stderr)
        rc, timed_out = None, True
    seconds = time.perf_counter() - t0
    if out_dir:
        (out_dir / "gpu_tests.log").write_text(output)
    lines = output.rstrip().splitlines()
    failed = sorted({m for m in re.findall(r"FAILED (tests/\S+)", output)})
    if failed:
        say("failed:\n  " + "\n  ".join(failed))
    say("\n".join(lines[-25:]) if len(lines) > 25 else output.rstrip())
    counts, complete = parse_pytest_summary(output)
    result = dict(counts, returncode=rc, seconds=round(seconds, 1), timed_out=timed_out)
    result["failed_tests"] = failed[:200]
    if timed_out:
        result["note"] = f"killed after {cfg['tests_timeout_s']} s; counts from the progress dots"
    elif not complete:
        result["note"] = "no pytest summary line found"
    return result


def _text(data):
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def tests_ok(result, cfg):
    if result is None or result.get("timed_out") or result.get("returncode") not in (0, 5):
        return False
    if result["failed"] or result["errors"]:
        return False
    return cfg["mode"] == "cpu-smoke" or result["passed"] > 0


# --- benchmark contenders -------------------------------------------------------------------------


class _Deadline:
    """Stands in for the trainer's Ctrl-C flag: it is "set" once ``seconds`` have passed, so that
    a far too slow epoch stops early and its time is extrapolated."""

    def __init__(self, seconds):
        self.end = time.perf_counter() + seconds

    @property
    def set(self):
        return time.perf_counter() > self.end


def _timed(fn, synchronize):
    synchronize()
    t0 = time.perf_counter()
    value = fn()
    synchronize()
    return time.perf_counter() - t0, value


class XpcnnContender:
    """xpcnn's SimpleCNN trained by `xpcnn.trainer.train_epoch` over a `TrainStep`, eager or
    compiled (``compile``), with or without the backend's fused kernels (``hooks``)."""

    def __init__(self, spec, images, labels, compile=False, hooks=True):
        self.backend = b = xpcnn.get_backend(spec)
        self.model = xpcnn.SimpleCNN(seed=SEED, device=spec)
        opt = xpcnn.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)
        self.step = TrainStep(self.model, opt, compile=compile)
        self.hooks = hooks
        how = "compiled" if self.step.compiled else "eager"
        self.label = f"xpcnn {spec} {how}" + ("" if hooks else " no hooks")
        self.data = trainer.DeviceData(b, images, labels)
        self.sync = trainer.HostSync()
        self.predict = None

    @contextlib.contextmanager
    def _hooks(self):
        """Without ``hooks``, the backend's fused kernels are off for the duration."""
        xp = self.backend.xp
        saved = {n: kernels.hook(xp, n) for n in kernels.registered(xp)}
        if not self.hooks:
            kernels.unregister(xp)
        try:
            yield
        finally:
            for name, fn in saved.items():
                kernels.register(xp, name, fn)

    def synchronize(self):
        self.backend.synchronize()

    def _epoch(self, order, limit):
        deadline = _Deadline(limit)
        stop = lambda: deadline.set  # noqa: E731
        return trainer.train_epoch(
            self.step, self.data, order, BATCH, LR, sync=self.sync, stop=stop
        )

    def epoch(self, index, order, limit):
        """Seconds, mean training loss, host read-backs and the fraction done of one epoch in
        ``order``; stopped after ``limit`` seconds."""
        b = self.backend
        with b.activate(), self._hooks():
            order = b.asarray(order, "int64")
            before = self.sync.count
            seconds, (loss, _, seen) = _timed(lambda: self._epoch(order, limit), self.synchronize)
        return seconds, loss, self.sync.count - before, seen / self.data.count

    def prepare_inference(self, batches):
        with self.backend.activate():
            self.batches = [self.backend.asarray(x, "float32") for x in batches]
        self.predict = predict_function(self.model, compile=self.step.compiled)

    def infer(self):
        try:
            with self.backend.activate(), self._hooks():
                for x in self.batches:
                    self.predict(x)
        finally:
            self.model.train()

    def probe_syncs(self, images, labels, steps):
        """torch CUDA only: synchronising calls PyTorch reports during ``steps`` training steps
        (`torch.cuda.set_sync_debug_mode`), hidden ones included, against HostSync's reads."""
        import torch

        data = trainer.DeviceData(self.backend, images[: steps * BATCH], labels[: steps * BATCH])
        order = self.backend.asarray(np.arange(data.count), "int64")
        self.synchronize()
        before = self.sync.count
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trainer.train_epoch(self.step, data, order, BATCH, LR, sync=self.sync)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        events = [w for w in caught if "synchroniz" in str(w.message).lower()]
        return {
            "contender": self.label,
            "steps": steps,
            "sync_events": len(events),
            "host_sync_reads": self.sync.count - before,
            "note": "a HostSync read is one transfer (one event); the rest are hidden syncs",
        }


def torch_simple_cnn():
    """The seed network in torch.nn, as xpcnn.interop defines it."""
    from xpcnn.interop import torch_simple_cnn as make

    return make()


class TorchContender:
    """PyTorch's own nn.Module and the textbook loop, with xpcnn's initial weights."""

    def __init__(self, device, images, labels):
        import torch

        self.torch = torch
        self.label = f"torch.nn {device}"
        self.device = torch.device(device)
        state = xpcnn.SimpleCNN(seed=SEED).state_dict()
        net = torch_simple_cnn()
        net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
        self.net = net.to(self.device)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=LR, momentum=MOMENTUM)
        self.images = torch.from_numpy(np.ascontiguousarray(images[:, None])).to(self.device)
        self.labels = torch.from_numpy(labels.astype(np.int64)).to(self.device)

    def synchronize(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def _epoch(self, order, limit):
        torch, n, stop = self.torch, len(order), _Deadline(limit)
        total = torch.zeros((), device=self.device)
        seen = 0
        for start in range(0, n, BATCH):
            if seen and stop.set:  # at least one step, always
                break
            idx = order[start : start + BATCH]
            x = self.images.index_select(0, idx).float().div_(255.0)
            y = self.labels.index_select(0, idx)
            self.opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(self.net(x), y)
            loss.backward()
            self.opt.step()
            total += loss.detach() * x.shape[0]
            seen += x.shape[0]
        return float(total) / seen, seen / n  # the epoch's one read-back

    def epoch(self, index, order, limit):
        order = self.torch.from_numpy(order).to(self.device)
        seconds, (loss, fraction) = _timed(lambda: self._epoch(order, limit), self.synchronize)
        return seconds, loss, 1, fraction

    def prepare_inference(self, batches):
        self.batches = [self.torch.from_numpy(x).to(self.device) for x in batches]

    def infer(self):
        self.net.eval()
        try:
            with self.torch.inference_mode():
                for x in self.batches:
                    self.net(x)
        finally:
            self.net.train()


# --- benchmark ------------------------------------------------------------------------------------


def benchmark_data(cfg):
    """``cfg["images"]`` training images: Fashion-MNIST if present, else tiled embedded digits."""
    n = cfg["images"]
    if cfg["mode"] != "cpu-smoke":
        try:
            data = datasets.load("fashion-mnist")
            if len(data.train_images) >= n:
                source = f"fashion-mnist ({data.source})"
                return data.train_images[:n], data.train_labels[:n], source
        except datasets.DatasetError:
            pass
    data = datasets.load("mnist-5k")
    reps = math.ceil(n / len(data.train_images))
    images = np.tile(data.train_images, (reps, 1, 1))[:n]
    labels = np.tile(data.train_labels, reps)[:n]
    how = f"tiled x{reps}" if reps > 1 else f"first {n}"
    source = f"mnist-5k training images, {how} (Fashion-MNIST not found or not used)"
    return images, labels, source


def median(values):
    return float(np.median(values)) if values else None


def run_benchmark(cfg, budget_s):
    """Interleaved rounds of one epoch per contender; round 0 is the warm-up (compilation)."""
    images, labels, source = benchmark_data(cfg)
    n = len(images)
    result = {
        "data": source,
        "images": n,
        "batch_size": BATCH,
        "lr": LR,
        "momentum": MOMENTUM,
        "budget_s": budget_s,
        "contenders": {},
        "errors": {},
    }
    say(f"data: {source}; {n} images, batch {BATCH}, SGD lr {LR} momentum {MOMENTUM} constant")
    makers = {
        "xpcnn-cupy": lambda: XpcnnContender(cfg["xpcnn_cupy"], images, labels),
        "xpcnn-cupy-plain": lambda: XpcnnContender(cfg["xpcnn_cupy"], images, labels, hooks=False),
        "xpcnn-torch": lambda: XpcnnContender(cfg["xpcnn_torch"], images, labels),
        "xpcnn-torch-graph": lambda: XpcnnContender(cfg["xpcnn_torch"], images, labels, True),
        "xpcnn-jax": lambda: XpcnnContender(cfg["xpcnn_jax"], images, labels, True),
        "torch-nn": lambda: TorchContender(cfg["torch_device"], images, labels),
    }
    contenders = {}
    for key, make in makers.items():
        try:
            contenders[key] = make()
            result["contenders"][key] = {"label": contenders[key].label, "rounds": []}
        except Exception as exc:
            result["errors"][key] = _error(exc)
            say(f"{key}: setup failed: {result['errors'][key]}")

    rng = np.random.default_rng(SEED)
    epoch_limit = budget_s / (2 * max(1, len(contenders)))  # a warm-up round fits in half
    t_start = time.perf_counter()
    last_round = 0.0
    for rnd in range(cfg["rounds"] + 1):
        elapsed = time.perf_counter() - t_start
        if rnd and elapsed + last_round > budget_s:
            result["note"] = (
                f"reduced to {rnd - 1} timed epoch(s) of {cfg['rounds']}: the next would pass "
                f"the {budget_s:.0f} s budget"
            )
            say(result["note"])
            break
        order = rng.permutation(n)
        t_round = time.perf_counter()
        line = []
        for key, c in list(contenders.items()):
            try:
                seconds, loss, syncs, fraction = c.epoch(rnd, order, epoch_limit)
            except Exception as exc:
                result["errors"][key] = _error(exc)
                say(f"{key}: epoch failed: {result['errors'][key]}")
                del contenders[key]
                continue
            row = {"seconds": seconds / fraction, "train_loss": loss, "host_syncs": syncs}
            row.update(warmup=rnd == 0, fraction=fraction)
            result["contenders"][key]["rounds"].append(row)
            cut = "" if fraction == 1 else f" ({fraction:.0%} done in {epoch_limit:.0f} s)"
            line.append(f"{key} {seconds / fraction:7.3f}s{cut} loss {loss:.4f} syncs {syncs}")
        last_round = time.perf_counter() - t_round
        say(f"{'warm-up' if rnd == 0 else f'round {rnd}'}: " + "  ".join(line))
    result["seconds_total"] = time.perf_counter() - t_start

    for entry in result["contenders"].values():
        timed = [r for r in entry["rounds"] if not r["warmup"]]
        rows = timed or entry["rounds"]  # only the warm-up if nothing else fitted
        entry["timed_epochs"] = len(timed)
        entry["extrapolated"] = any(r["fraction"] < 1 for r in rows)
        entry["epoch_s_median"] = median([r["seconds"] for r in rows])
        entry["epoch_s_min"] = min((r["seconds"] for r in rows), default=None)
        entry["epoch_s_max"] = max((r["seconds"] for r in rows), default=None)
        entry["host_syncs_per_epoch"] = median([r["host_syncs"] for r in rows])
        if entry["epoch_s_median"]:
            entry["images_per_s"] = n / entry["epoch_s_median"]
    result["ratios"] = _ratios(result["contenders"])
    return result, contenders, images, labels


def _ratios(entries):
    """Median over rounds of each xpcnn epoch time divided by torch.nn's in the same round."""
    ratios = {}
    if "torch-nn" not in entries:
        return ratios
    ref = {i: r["seconds"] for i, r in enumerate(entries["torch-nn"]["rounds"]) if not r["warmup"]}
    for key in [k for k in entries if k.startswith("xpcnn")]:
        if key in entries:
            rounds = entries[key]["rounds"]
            per = [r["seconds"] / ref[i] for i, r in enumerate(rounds) if i in ref]
            if per:
                ratios[f"{key}/torch-nn"] = median(per)
    return ratios


def run_inference(cfg, contenders, images):
    """Images per second at batch 1000 in eval mode, median of several repeats."""
    count = cfg["infer_batches"] * INFER_BATCH
    reps = math.ceil(count / len(images))
    host = np.tile(images, (reps, 1, 1))[:count, None].astype(np.float32) / 255.0
    batches = [host[i : i + INFER_BATCH] for i in range(0, count, INFER_BATCH)]
    result = {"batch_size": INFER_BATCH, "images_per_repeat": count, "results": {}, "errors": {}}
    for key, c in contenders.items():
        try:
            c.prepare_inference(batches)
            c.infer()  # warm-up: compilation and allocation
            c.infer()
            times = [_timed(c.infer, c.synchronize)[0] for _ in range(cfg["infer_repeats"])]
            result["results"][key] = {
                "images_per_s": count / median(times),
                "repeat_s": times,
            }
            say(f"{key}: {count / median(times):,.0f} images/s (median of {len(times)})")
        except Exception as exc:
            result["errors"][key] = _error(exc)
            say(f"{key}: inference failed: {result['errors'][key]}")
        finally:
            c.batches = None
    return result


def run_accuracy(cfg):
    """``xpcnn.train`` with its defaults on the embedded digits, on the CuPy backend."""
    spec = cfg["xpcnn_cupy"]
    kwargs = {} if cfg["accuracy_epochs"] is None else {"epochs": cfg["accuracy_epochs"]}
    data = datasets.load("mnist-5k")
    if cfg["accuracy_subset"]:
        n, m = cfg["accuracy_subset"]
        data = datasets.Dataset(
            "mnist-5k", data.train_images[:n], data.train_labels[:n], data.test_images[:m],
            data.test_labels[:m], data.source,
        )  # fmt: skip
    backend = xpcnn.get_backend(spec)
    t0 = time.perf_counter()
    res = xpcnn.train(dataset=data, device=spec, progress=False, **kwargs)
    backend.synchronize()
    seconds = time.perf_counter() - t0
    last = res.history[-1]
    return {
        "device": spec,
        "dataset": f"mnist-5k {len(data.train_images)}/{len(data.test_images)}",
        "epochs": last["epoch"],
        "test_accuracy": last["test_accuracy"],
        "test_loss": last["test_loss"],
        "seconds": seconds,
        "host_syncs": res.host_syncs,
        "note": "" if not kwargs else "--cpu-smoke: fewer epochs and images than the defaults",
    }


def cupy_capture_probe():
    """Whether this CuPy can capture an elementwise kernel and a matrix product in a CUDA graph
    (it refused cuBLAS during capture up to at least 14.x: cupy/cupy#6290)."""
    import cupy

    out = {}
    a = cupy.ones((64, 64), dtype=cupy.float32)
    for name, fn in (("elementwise", lambda: a * 2 + 1), ("matmul", lambda: a @ a)):
        stream = cupy.cuda.Stream(non_blocking=True)
        try:
            with stream:
                fn()  # warm-up outside capture
                stream.begin_capture()
                try:
                    fn()
                finally:
                    graph = stream.end_capture()
            graph.launch(stream)
            stream.synchronize()
            out[name] = "captured and replayed"
        except Exception as exc:
            out[name] = f"refused: {type(exc).__name__}: {str(exc)[:160]}"
    say(json.dumps(out))
    return out


def _error(exc):
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}: {exc}"[:300] + where


# --- report ---------------------------------------------------------------------------------------


def _fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def summary_table(report):
    """The closing table, as text."""
    env, stages = report.get("environment") or {}, report["stages"]
    get = env.get
    driver = get("driver", "-")
    if "cuda_driver_api" in env:
        driver += f" (CUDA driver API {env['cuda_driver_api']})"
    versions = ("cupy", "torch", "numpy", "xpcnn", "array_api_compat", "python")
    rows = [
        ("mode", report["mode"]),
        ("card", get("card", "-")),
        ("driver", driver),
        ("CUDA runtime", f"cupy {get('cuda_runtime_cupy', '-')}, torch built for "
                         f"{get('cuda_torch_built', '-')}"),
        ("versions", ", ".join(f"{k} {get(k, '-')}" for k in versions)),
        ("TF32", f"torch matmul {get('torch_matmul_allow_tf32', '-')}, cudnn "
                 f"{get('torch_cudnn_allow_tf32', '-')}, CUPY_TF32 {get('CUPY_TF32', '-')}"),
    ]  # fmt: skip
    t = report.get("tests")
    if t:
        text = (
            f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped, "
            f"{t['errors']} errors in {t['seconds']} s"
        )
        rows.append(("tests (-m gpu)", text + (f" [{t['note']}]" if t.get("note") else "")))
    else:
        rows.append(("tests (-m gpu)", "not run"))
    lines = [f"{k:<18}{v}" for k, v in rows]

    b = report.get("benchmark")
    if b:
        lines.append(
            f"{'train data':<18}{b['data']}, {b['images']} images, batch {b['batch_size']}"
        )
        if b.get("note"):
            lines.append(f"{'':<18}{b['note']}")
        inf = (report.get("inference") or {}).get("results", {})
        lines.append(
            f"{'contender':<24}{'epoch s':>9}{'min-max':>15}{'epochs':>7}{'train img/s':>13}"
            f"{'syncs/ep':>10}{'loss':>8}{'infer img/s':>13}"
        )
        for key, e in b["contenders"].items():
            last = e["rounds"][-1]["train_loss"] if e["rounds"] else None
            spread = f"{_fmt(e.get('epoch_s_min'), '.3f')}-{_fmt(e.get('epoch_s_max'), '.3f')}"
            timed = e.get("timed_epochs", 0)
            lines.append(
                f"{e['label']:<24}{_fmt(e.get('epoch_s_median'), '.3f'):>9}{spread:>15}"
                f"{timed if timed else 'w-up':>7}{_fmt(e.get('images_per_s'), ',.0f'):>13}"
                f"{_fmt(e.get('host_syncs_per_epoch'), '.0f'):>10}{_fmt(last, '.4f'):>8}"
                f"{_fmt(inf.get(key, {}).get('images_per_s'), ',.0f'):>13}"
            )
        for key, err in b["errors"].items():
            lines.append(f"{key:<24}FAILED {err}")
        for e in b["contenders"].values():
            if e.get("extrapolated"):
                lines.append(f"{e['label']:<24}epochs stopped early, times extrapolated")
        labels = {k: e["label"] for k, e in b["contenders"].items()}
        for key, value in b["ratios"].items():
            num, den = (labels[k] for k in key.split("/"))
            lines.append(f"{'epoch time ratio':<18}{num} / {den}: {value:.2f} (median over rounds)")
        for probe in b.get("sync_probe") or []:
            lines.append(
                f"{'torch sync debug':<18}{probe['sync_events']} synchronising calls in "
                f"{probe['steps']} steps of {probe['contender']}, {probe['host_sync_reads']} "
                "HostSync read(s), one transfer each"
            )
    a = report.get("accuracy")
    if a:
        text = (
            f"{a['test_accuracy']:.4f} test accuracy ({a['dataset']}, {a['device']}, "
            f"{a['epochs']} epochs, {a['seconds']:.1f} s, {a['host_syncs']} host syncs)"
        )
        lines.append(f"{'accuracy':<18}{text}" + (f" [{a['note']}]" if a["note"] else ""))
    for name, status in stages.items():
        if status != "ok":
            lines.append(f"{'stage ' + name:<18}{status}")
    lines.append(f"{'total':<18}{report['seconds']:.0f} s, status {report['status']}")
    width = min(100, max(len(line) for line in lines))
    return "\n".join(["=" * width, "gpu_check summary", "-" * width, *lines, "=" * width])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--cpu-smoke", action="store_true", help="same code paths on the CPU, small and quick"
    )
    p.add_argument("--skip-tests", action="store_true", help="skip the pytest stage")
    args = p.parse_args(argv)
    cfg = CPU_SMOKE if args.cpu_smoke else GPU
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report = {"mode": cfg["mode"], "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "stages": {}}

    def stage(name, fn):
        say(f"\n== {name} ==")
        try:
            value = fn()
            report["stages"][name] = "ok"
            return value
        except Exception as exc:
            traceback.print_exc()
            report["stages"][name] = f"CRASHED: {_error(exc)}"
            return None

    report["environment"] = stage("environment", lambda: environment(cfg))
    say(json.dumps(report["environment"], indent=1, default=str))
    if args.skip_tests:
        report["stages"]["tests"] = "skipped (--skip-tests)"
    else:
        report["tests"] = stage("tests", lambda: run_tests(cfg, out_dir))
        if report["tests"] and not tests_ok(report["tests"], cfg):
            report["stages"]["tests"] = "FAILED"

    if cfg["mode"] == "gpu":
        report["cupy_capture"] = stage("cupy capture probe", cupy_capture_probe)

    left = TOTAL_BUDGET_S - (time.perf_counter() - t0)
    budget = max(10.0, min(cfg["bench_budget_s"], left - 60))
    bench = stage("benchmark", lambda: run_benchmark(cfg, budget))
    contenders = {}
    if bench:
        report["benchmark"], contenders, images, labels = bench
        if report["benchmark"]["errors"]:
            report["stages"]["benchmark"] = "FAILED: " + "; ".join(report["benchmark"]["errors"])
        probes = [contenders.get(k) for k in ("xpcnn-torch", "xpcnn-torch-graph")]
        probes = [c for c in probes if c is not None and c.backend.device.type == "cuda"]
        if probes:
            report["benchmark"]["sync_probe"] = stage(
                "sync probe",
                lambda: [c.probe_syncs(images, labels, cfg["sync_probe_steps"]) for c in probes],
            )
        report["inference"] = stage("inference", lambda: run_inference(cfg, contenders, images))
        if report["inference"] and report["inference"]["errors"]:
            report["stages"]["inference"] = "FAILED: " + "; ".join(report["inference"]["errors"])
    contenders.clear()

    if time.perf_counter() - t0 < TOTAL_BUDGET_S - 30:
        report["accuracy"] = stage("accuracy", lambda: run_accuracy(cfg))
    else:
        report["stages"]["accuracy"] = "skipped: out of time"

    failed = [k for k, v in report["stages"].items() if v != "ok" and not v.startswith("skipped")]
    report["status"] = "FAILED (" + ", ".join(failed) + ")" if failed else "OK"
    report["seconds"] = time.perf_counter() - t0
    table = summary_table(report)
    if out_dir:
        report["table"] = table
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    say("\n" + table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
