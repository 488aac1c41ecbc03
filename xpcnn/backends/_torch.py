"""PyTorch tensors driven by xpcnn's own layers (not torch.nn), via array-api-compat."""

from .base import Backend, BackendUnavailable


class TorchBackend(Backend):
    """torch tensors on the CPU or one CUDA device, run by xpcnn's layers."""

    family = "torch"

    @property
    def eval_chunk(self):
        return 16384 if self.device.type == "cuda" else 128

    def to_host(self, x):
        return x.detach().cpu().numpy()

    def synchronize(self):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)


def make(arg):
    """A torch backend for ``arg`` = ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; raises
    BackendUnavailable (torch missing, no such GPU) or ValueError (malformed)."""
    arg = arg or "cpu"
    if arg == "cuda":
        arg = "cuda:0"
    kind, _, index = arg.partition(":")
    if kind not in ("cpu", "cuda") or (kind == "cpu" and index) or (index and not index.isdigit()):
        raise ValueError(f"unknown torch device {arg!r}; valid: 'torch:cpu', 'torch:cuda:N'")
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailable(
            f"PyTorch is not installed ({exc}); pip install 'xpcnn[torch]'"
        ) from None
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(
                f"torch {torch.__version__} sees no CUDA device "
                f"(built with CUDA {torch.version.cuda or 'none: a CPU-only build'})"
            )
        count = torch.cuda.device_count()
        if int(index) >= count:
            raise BackendUnavailable(f"torch:{arg} asked for, but only {count} CUDA device(s)")
    import array_api_compat.torch as xp

    return TorchBackend(f"torch:{arg}", xp, torch.device(arg))
