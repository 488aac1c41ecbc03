"""Data augmentation on the device: random crops with padding and horizontal flips, per image.

Everything is Array API code on the batch where it already lives (no host round trip), with
the random numbers drawn by an `xpcnn.random.Generator` on the same device, so a seeded run is
reproducible and a resumed run continues the same stream of crops and flips.

    aug = Augment(crop=2, flip=True)          # or parse("crop2+flip")
    x = aug(x, generator)                     # (N, C, H, W) -> (N, C, H, W)

Random crop with padding ``p``: pad every image by ``p`` zeros on each side, then cut out an
H x W window at a random offset ``(dy, dx)`` in ``[0, 2p]``: the image moves by up to ``p``
pixels in each direction, its border filled with zeros (Fashion-MNIST's background). Horizontal
flip: with probability 1/2, an image's columns are reversed.

Both are one gather: output pixel (n, c, y, x) takes padded pixel ``(n, c, dy[n] + y,
col[n, x])`` with ``col[n, x] = dx[n] + x``, or ``dx[n] + W - 1 - x`` for a flipped image, read
with ``take`` from the flattened padded batch. Without a crop, a flip is ``where(flipped,
flip(x, axis=3), x)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import array_api_extra as xpx
from array_api_compat import device

from ._namespace import array_namespace

__all__ = ["Augment", "parse"]

_SPEC = re.compile(r"^(?:crop(\d*)|flip)$")


@dataclass(frozen=True)
class Augment:
    """Random crop with ``crop`` pixels of zero padding (0: none) and random horizontal flips
    (``flip``), applied independently to every image of a batch."""

    crop: int = 0
    flip: bool = False

    def __post_init__(self):
        if isinstance(self.crop, bool) or not isinstance(self.crop, int) or self.crop < 0:
            raise ValueError(f"augment: crop padding must be an integer >= 0, got {self.crop!r}")
        if not isinstance(self.flip, bool):
            raise ValueError(f"augment: flip must be True or False, got {self.flip!r}")

    @property
    def spec(self) -> str:
        """The canonical text form, e.g. ``"crop2+flip"`` (``"none"`` for nothing)."""
        parts = ([f"crop{self.crop}"] if self.crop else []) + (["flip"] if self.flip else [])
        return "+".join(parts) or "none"

    def __bool__(self):
        return bool(self.crop or self.flip)

    def __call__(self, x, generator):
        """The augmented copy of the (N, C, H, W) batch ``x``; random numbers come from
        ``generator`` (on ``x``'s device): crop offsets first, then the flips."""
        if not self:
            return x
        xp = array_namespace(x)
        n, c, h, w = x.shape
        if not self.crop:
            flipped = generator.bernoulli(0.5, (n,))
            return xp.where(flipped[:, None, None, None], xp.flip(x, axis=3), x)
        return _crop_flip(x, generator, self.crop, self.flip)


def _crop_flip(x, generator, p, flip):
    """Random crop (padding ``p``) and, if ``flip``, random flips, as one gather."""
    xp = array_namespace(x)
    dev = device(x)
    n, c, h, w = x.shape
    hp, wp = h + 2 * p, w + 2 * p
    padded = xpx.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), xp=xp)
    dy = generator.integers(0, 2 * p + 1, (n,))
    dx = generator.integers(0, 2 * p + 1, (n,))
    rows = dy[:, None] + xp.arange(h, dtype=dy.dtype, device=dev)  # (N, H)
    step = xp.arange(w, dtype=dx.dtype, device=dev)
    cols = dx[:, None] + step  # (N, W)
    if flip:
        flipped = generator.bernoulli(0.5, (n,))
        cols = xp.where(flipped[:, None], dx[:, None] + (w - 1) - step, cols)
    images = xp.arange(n * c, dtype=dy.dtype, device=dev) * (hp * wp)  # start of each (n, c)
    index = (
        xp.reshape(images, (n, c, 1, 1))
        + xp.reshape(rows * wp, (n, 1, h, 1))
        + xp.reshape(cols, (n, 1, 1, w))
    )
    out = xp.take(xp.reshape(padded, (-1,)), xp.reshape(index, (-1,)), axis=0)
    return xp.reshape(out, (n, c, h, w))


def parse(spec) -> Augment:
    """An `Augment` from ``None``/``"none"`` (nothing), a string such as ``"crop+flip"``,
    ``"crop4"``, ``"flip"`` (``crop`` alone means padding 2), a dict ``{"crop": 2, "flip":
    True}`` or an `Augment`. Raises ValueError for anything else."""
    if spec is None or isinstance(spec, Augment):
        return spec or Augment()
    if isinstance(spec, dict):
        unknown = set(spec) - {"crop", "flip"}
        if unknown:
            raise ValueError(f"augment: unknown keys {sorted(unknown)}; known: crop, flip")
        return Augment(spec.get("crop", 0), spec.get("flip", False))
    if not isinstance(spec, str):
        raise ValueError(f"augment must be a string such as 'crop+flip', got {spec!r}")
    text = spec.strip().lower().replace(" ", "")
    if text in ("", "none"):
        return Augment()
    crop, flip = 0, False
    for part in text.split("+"):
        m = _SPEC.match(part)
        if not m:
            raise ValueError(
                f"augment: unknown part {part!r} in {spec!r}; use 'crop', 'cropN' (N pixels "
                "of padding), 'flip', joined by '+', or 'none'"
            )
        if part == "flip":
            flip = True
        else:
            crop = int(m.group(1) or 2)
    return Augment(crop, flip)
