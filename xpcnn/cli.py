"""The ``xpcnn`` command: ``train``, ``evaluate``, ``backends``, ``compare``.

Exit status: 0 done; 2 bad arguments or data (one line on stderr, never a traceback); 1 training
diverged; 130 interrupted by Ctrl-C (after saving a checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import warnings

from .conv import INPUT_GRAD_METHODS
from .trainer import DEFAULT_EPOCHS, DEFAULTS, SCHEDULES

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error; we want one clear line
        raise _UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


class _UsageError(Exception):
    pass


class _Failed(Exception):
    """A run that finished but whose result is not usable (exit 1)."""


def _one_line(exc):
    """An exception's message as one line (torch and NumPy messages can span several)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text if len(text) <= 600 else text[:597] + "..."


def _int_at_least(minimum, what):
    """An argparse type: an integer >= ``minimum``, else "expected <what>" naming the text."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "a non-negative integer")


def _non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _workers(text):
    if text == "auto":
        return text
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected 'auto' or a positive integer, got {text!r}"
        ) from None


_WORKERS_HELP = (
    "threads sharing each batch, each with a replica of the model (CPU backends; default "
    "auto: one per BLAS thread on NumPy, none elsewhere"
)


def build_parser():
    """The argparse parser of every subcommand (its errors raise instead of exiting)."""
    parser = _Parser(prog="xpcnn", description="CNNs with hand-written gradients on the Array API.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a model (default: SimpleCNN on embedded MNIST digits)")
    t.add_argument(
        "--model",
        default=None,
        metavar="NAME|CONFIG.json",
        help="a zoo model (simplecnn, lenet5, minivgg; default simplecnn) or a JSON model "
        "config; a zoo model's recipe sets every option below left unset",
    )
    t.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, torch, torch:cuda:N, ...")
    t.add_argument(
        "--dataset",
        default="mnist-5k",
        help="mnist-5k (embedded), fashion-mnist, mnist, or a directory of IDX files",
    )
    t.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help=f"total epochs (default {DEFAULT_EPOCHS})",
    )
    t.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="images per step (default 128, or the checkpoint's on --resume)",
    )
    t.add_argument(
        "--optimizer", choices=["sgd", "adam"], default=None, help="update rule (default sgd)"
    )
    t.add_argument(
        "--lr",
        type=_non_negative_float,
        default=None,
        help=f"learning rate (default: {DEFAULTS['sgd']['lr']} for sgd, "
        f"{DEFAULTS['adam']['lr']} for adam)",
    )
    t.add_argument(
        "--momentum", type=_non_negative_float, default=None, help="SGD momentum (default 0.9)"
    )
    t.add_argument(
        "--weight-decay",
        type=_non_negative_float,
        default=None,
        help="L2 weight decay (default 0, or the checkpoint's on --resume)",
    )
    t.add_argument(
        "--schedule",
        choices=sorted(SCHEDULES),
        default=None,
        help="learning-rate schedule (default cosine, or the checkpoint's on --resume)",
    )
    t.add_argument(
        "--augment",
        default=None,
        metavar="SPEC",
        help="augmentation on the device: crop (pad 2), cropN, flip, joined by '+' "
        "(crop+flip), or none (default: the model's recipe, or the checkpoint's on --resume)",
    )
    t.add_argument("--seed", type=_non_negative_int, default=0)
    t.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    t.add_argument(
        "--input-grad",
        choices=list(INPUT_GRAD_METHODS),
        default=None,
        help="how convolutions compute the input gradient (default dilation)",
    )
    t.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the training step (default: wherever the backend can: jax, torch:cuda)",
    )
    t.add_argument(
        "--workers",
        type=_workers,
        default="auto",
        help=_WORKERS_HELP + ", in MPI jobs or for models with batch norm; at most one per 32 "
        "images; on --resume the checkpoint's)",
    )
    t.add_argument("--checkpoint", default=None, help="save a checkpoint here after every epoch")
    t.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    t.add_argument(
        "--plot",
        metavar="FILE.png",
        default=None,
        help="save loss/accuracy curves (needs matplotlib: pip install 'xpcnn[plot]')",
    )
    t.add_argument(
        "--history", metavar="FILE.json", default=None, help="write the per-epoch history as JSON"
    )
    shown = t.add_mutually_exclusive_group()
    shown.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="a progress bar (default: only when stderr is a terminal)",
    )
    shown.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="plain log lines, no progress bar (the default for pipes and files)",
    )

    e = sub.add_parser("evaluate", help="loss and accuracy of a checkpoint on a test set")
    e.add_argument("checkpoint")
    e.add_argument("--dataset", default="mnist-5k")
    e.add_argument("--device", default="cpu")
    e.add_argument("--batch-size", type=_positive_int, default=1000)
    e.add_argument("--workers", type=_workers, default="auto", help=_WORKERS_HELP + ")")

    sub.add_parser("backends", help="every backend, whether it works here, and why not")

    c = sub.add_parser(
        "compare",
        help="the same weights in PyTorch, a naive loop reference and xpcnn: agreement and speed",
    )
    c.add_argument(
        "--weights",
        default=None,
        help=".pth/.pt/.safetensors state dict or xpcnn checkpoint (default: a fresh --model)",
    )
    c.add_argument(
        "--model",
        default="simplecnn",
        help="zoo model to compare when no --weights are given (simplecnn, lenet5, minivgg)",
    )
    c.add_argument(
        "--train-epochs",
        type=_positive_int,
        default=None,
        help="train with xpcnn for this many epochs first",
    )
    c.add_argument("--dataset", default="mnist-5k")
    c.add_argument("--device", default="cpu", help="where xpcnn runs (torch runs on the CPU)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--limit", type=_positive_int, default=None, help="use the first N test images")
    c.add_argument(
        "--threads", type=_positive_int, default=None, help="CPU threads (default: torch's)"
    )
    c.add_argument(
        "--latency-images",
        type=_positive_int,
        default=200,
        help="images timed one by one (torch, xpcnn)",
    )
    c.add_argument(
        "--naive-images",
        type=_positive_int,
        default=20,
        help="images timed one by one for the slow naive reference",
    )
    c.add_argument("--batch-size", type=_positive_int, default=1000, help="throughput batch")
    c.add_argument("--repeats", type=_positive_int, default=5, help="timed runs per median")
    c.add_argument("--grad-batch", type=_positive_int, default=64, help="training-step batch")
    c.add_argument("--json", metavar="FILE.json", default=None, help="also write the numbers")
    return parser


def _cmd_train(args):
    from . import models
    from . import trainer as T

    if args.plot:
        _require_matplotlib()
    if args.resume and not args.checkpoint:
        raise _UsageError("xpcnn train: --resume needs --checkpoint PATH")
    if args.augment is not None:
        from .augment import parse

        parse(args.augment)  # a bad spec is a usage error before any data is read
    settings = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "schedule": args.schedule,
        "augment": args.augment,
    }
    model = None
    if not args.resume or args.model:
        from .datasets import load
        from .distributed import setup

        world = setup(None)  # in an MPI job, a rank that cannot load stops all, with one message
        with contextlib.nullcontext() if world is None else world.agreement():
            data = load(args.dataset)
            name = args.model or "simplecnn"
            model = models.build_named(name, data.num_classes, seed=args.seed, dtype=args.dtype)
        args.dataset = data  # train() fills what is unset from the model's recipe
    result = T.train(
        model,
        device=args.device,
        dataset=args.dataset,
        seed=args.seed,
        checkpoint=args.checkpoint,
        resume=args.resume,
        progress=args.progress,
        input_grad=args.input_grad,
        compile=args.compile,
        workers=args.workers,
        **settings,
    )
    from .distributed import is_main_process

    if not is_main_process():  # a rank > 0 of an MPI job: rank 0 writes and reports
        return 0
    if args.history:
        with open(args.history, "w") as f:
            json.dump(result.history, f, indent=1)
    if args.plot:
        from .plots import plot_history

        plot_history(result.history, args.plot)
        print(f"curves saved to {args.plot}")
    if result.history:
        last = result.history[-1]
        print(f"final test accuracy {last['test_accuracy']:.4f} (loss {last['test_loss']:.4f})")
    return 0


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise _UsageError("--plot needs matplotlib: pip install 'xpcnn[plot]'") from None


def _cmd_evaluate(args):
    from .trainer import evaluate, load_checkpoint

    model, meta = load_checkpoint(args.checkpoint, device=args.device)
    r = evaluate(model, args.dataset, batch_size=args.batch_size, workers=args.workers)
    if not (math.isfinite(r.loss) and math.isfinite(r.accuracy)):
        raise _Failed(f"{args.checkpoint}: the loss on {args.dataset} is {r.loss} (not finite)")
    print(
        f"{args.checkpoint}: epoch {meta.get('epoch', '?')}, {r.count} test images of "
        f"{args.dataset}: accuracy {r.accuracy:.4f}, loss {r.loss:.4f}"
    )
    return 0


def _cmd_backends(args):
    from .backends import available_backends

    for s in available_backends():
        mark = "yes" if s.available else "no "
        print(f"{s.name:<20} {mark}  {s.reason}".rstrip())
    return 0


def _cmd_compare(args):
    try:
        from .compare import compare, format_report

        result = compare(
            args.weights,
            model=args.model,
            dataset=args.dataset,
            device=args.device,
            train_epochs=args.train_epochs,
            seed=args.seed,
            limit=args.limit,
            threads=args.threads,
            latency_images=args.latency_images,
            naive_images=args.naive_images,
            batch_size=args.batch_size,
            repeats=args.repeats,
            grad_batch=args.grad_batch,
        )
    except ImportError as exc:  # torch (or safetensors) missing
        raise _UsageError(f"xpcnn compare: {exc}") from None
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def main(argv=None):
    """Run the command line ``argv`` (default: sys.argv[1:]); returns the exit status. In an
    MPI job only rank 0 prints (`xpcnn.distributed`); a rank that fails alone says so itself."""
    from .distributed import quiet_unless_main

    with quiet_unless_main():
        return _main(argv)


def _main(argv):
    import numpy as np

    from .backends import BackendUnavailable
    from .checkpoint import CheckpointError
    from .datasets import DatasetError
    from .distributed import DistributedError
    from .trainer import TrainingDiverged, TrainingInterrupted

    try:
        args = build_parser().parse_args(argv)
        command = {
            "train": _cmd_train,
            "evaluate": _cmd_evaluate,
            "backends": _cmd_backends,
            "compare": _cmd_compare,
        }[args.command]
        # Overflow warnings of a diverging run would print multi-line tracebacks; divergence is
        # caught by the trainer's finiteness checks and reported in one line instead.
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            return command(args)
    except _UsageError as exc:
        print(_one_line(exc), file=sys.stderr)
        return EXIT_USAGE
    except _Failed as exc:
        print(f"xpcnn: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except (
        DatasetError,
        CheckpointError,
        BackendUnavailable,
        DistributedError,
        ValueError,
        TypeError,
        OSError,
    ) as exc:
        print(f"xpcnn: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged as exc:
        print(f"xpcnn: training diverged: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except TrainingInterrupted as exc:
        print(f"xpcnn: {_one_line(exc)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("xpcnn: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
