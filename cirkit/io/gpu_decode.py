"""Batched JPEG decoding on the GPU, so ``embed`` on one GPU is not held back by CPU decoding.

On a GPU, decoding and resizing photos in a few CPU workers is what limits ``embed``
(a ViT-B/32 embeds several thousand 224 px images per second; a CPU core decodes and resizes
~100-200 full-size JPEGs per second). With ``--gpu-decode`` (``auto``: on when the model runs
on CUDA), DataLoader workers only read the encoded bytes and check the header (the same size
limits as :func:`cirkit.io.open_image`), and the main process decodes each batch with
``torchvision.io.decode_jpeg(list, device="cuda")`` (nvJPEG), then applies the backbone's own
preprocessing as tensor ops on the GPU (:func:`device_plan`: resize of the shorter side,
centre crop, normalisation, read from the open_clip/torchvision ``Compose``).

Anything that is not a plain JPEG (PNG, WebP, CMYK JPEGs nvJPEG refuses, ...) is decoded and
transformed in the workers as before, so results never depend on what the GPU path accepts.
The GPU resize is torch's antialiased bicubic on the decoded pixels, not PIL's; vectors agree
with the CPU path to within resampling noise (cosine > 0.99 on photos), which is why the path
is a setting and off on CPUs. A backbone whose preprocessing is not such a ``Compose`` (the
MLLM processors, the ``fake`` test backbone) always decodes on the CPU.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cirkit.errors import CirkitError, ImageError

MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class DevicePlan:
    """A backbone's image preprocessing as tensor ops: shorter side to ``size``, centre crop, normalise."""

    size: int
    crop: tuple[int, int]
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 (3, H, W) images (on any device) -> the normalised float batch the model takes."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        mode = InterpolationMode(self.interpolation)
        out = []
        for im in images:
            x = F.resize(im.float(), [self.size], interpolation=mode, antialias=True)
            x = F.center_crop(x.round_().clamp_(0, 255), list(self.crop))  # PIL resizes in uint8: round like it
            out.append(x)
        batch = torch.stack(out).div_(255.0)
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        return batch.sub_(mean).div_(std)


def device_plan(transform: Any) -> DevicePlan | None:
    """The :class:`DevicePlan` equal to ``transform`` (a torchvision ``Compose``), or None when it is anything else."""
    steps = list(getattr(transform, "transforms", []) or [])
    names = [type(t).__name__ for t in steps]
    allowed = {"Resize", "CenterCrop", "MaybeConvertMode", "MaybeToTensor", "ToTensor", "Normalize",
               "_convert_to_rgb", "function"}
    if not steps or any(n not in allowed for n in names) or names.count("Resize") != 1 or "Normalize" not in names:
        return None
    resize = steps[names.index("Resize")]
    norm = steps[names.index("Normalize")]
    size = resize.size if isinstance(resize.size, int) else (resize.size[0] if len(resize.size) == 1 else None)
    if size is None or getattr(resize, "max_size", None) is not None:
        return None  # a fixed (h, w) resize distorts; not what open_clip's eval transform does
    crop = steps[names.index("CenterCrop")].size if "CenterCrop" in names else (size, size)
    crop = (crop, crop) if isinstance(crop, int) else tuple(crop)
    return DevicePlan(int(size), (int(crop[0]), int(crop[1])), resize.interpolation.value,
                      tuple(float(m) for m in norm.mean), tuple(float(s) for s in norm.std))


def wanted(mode: str | None, backbone: Any) -> DevicePlan | None:
    """The plan to use for ``--gpu-decode mode`` with this backbone, or None (decode on the CPU)."""
    mode = (mode or "off").lower()
    if mode not in MODES:
        raise CirkitError(f"unknown --gpu-decode {mode!r}; choose auto, on or off")
    if mode == "off":
        return None
    plan = device_plan(backbone.image_transform())
    if mode == "auto":
        on_cuda = getattr(getattr(backbone, "device", None), "type", "cpu") == "cuda"
        return plan if on_cuda else None
    if plan is None:
        raise CirkitError(f"--gpu-decode on: the {backbone.name} backbone's preprocessing cannot run as tensor ops; "
                          f"use --gpu-decode off")
    return plan


# -- the worker side: bytes and a header check ----------------------------------------------------
class RawImages(torch.utils.data.Dataset):
    """``(id, payload, error)``: JPEG bytes for the GPU, or (for anything else) the CPU-transformed image."""

    def __init__(self, items: Sequence[tuple[str, Any]], transform: Callable[[Any], Any]):
        self.items, self.transform = list(items), transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        key, image = self.items[i]
        try:
            return (key, *_payload(image, self.transform), None)
        except ImageError as e:
            return key, None, None, e.reason


class RawStream(torch.utils.data.IterableDataset):
    """:class:`RawImages` for an :class:`~cirkit.io.datasets.ImageStream` (``datasets`` splits it between workers)."""

    def __init__(self, stream: Any, transform: Callable[[Any], Any]):
        self.stream, self.transform = stream, transform

    def __iter__(self):
        for key, image in self.stream.iterate():
            try:
                yield (key, *_payload(image, self.transform), None)
            except ImageError as e:
                yield key, None, None, e.reason


def _payload(image: Any, transform: Callable[[Any], Any]) -> tuple[str, Any]:
    """``("jpeg", uint8 byte tensor)`` for a JPEG that passes the limits, else ``("cpu", transformed image)``."""
    from PIL import Image

    from cirkit.io.images import check_size, open_image

    data = _read_bytes(image)
    if data is not None and data[:3] == b"\xff\xd8\xff":
        try:
            with Image.open(io.BytesIO(data)) as im:  # header only: the limits before any decoding
                refused = check_size(*im.size)
                ok = im.format == "JPEG" and im.mode in ("RGB", "L")
        except Exception:  # noqa: BLE001 - anything PIL cannot read goes the CPU way and fails there, named
            refused, ok = None, False
        if refused:
            raise ImageError(str(image), refused)
        if ok:
            return "jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return "cpu", transform(open_image(data if data is not None else image))


def _read_bytes(image: Any) -> bytes | None:
    """The encoded bytes of a file or a dataset row's image (None: let open_image report the problem)."""
    from pathlib import Path

    src = image.image_source() if hasattr(image, "image_source") else image
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    try:
        p = Path(src)
        return p.read_bytes() if p.is_file() else None
    except OSError:
        return None


def collate(items: list[Any]) -> tuple[list[str], list[tuple[str, Any]], list[tuple[str, str]]]:
    good = [(k, (kind, x)) for k, kind, x, e in items if e is None]
    bad = [(k, e) for k, _, _, e in items if e is not None]
    return [k for k, _ in good], [p for _, p in good], bad


# -- the main process: decode a batch on the device -------------------------------------------------
def decode_batch(payloads: list[tuple[str, Any]], plan: DevicePlan, device: Any,
                 keys: list[str]) -> tuple[torch.Tensor | None, list[str], list[tuple[str, str]]]:
    """The model batch of one loader batch: JPEGs decoded together on ``device``, the rest as the workers made them.

    Returns ``(batch, ids kept, failures)``: a JPEG nvJPEG cannot decode is decoded alone on the
    CPU, and reported as a failure only if that fails too.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    jpeg_at = [i for i, (kind, _) in enumerate(payloads) if kind == "jpeg"]
    decoded: dict[int, torch.Tensor] = {}
    if jpeg_at:
        data = [payloads[i][1] for i in jpeg_at]
        try:
            out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
            decoded = dict(zip(jpeg_at, out, strict=True))
        except RuntimeError:  # one image nvJPEG refuses fails the batch: decode them one by one
            for i, d in zip(jpeg_at, data, strict=True):
                try:
                    decoded[i] = decode_jpeg(d, mode=ImageReadMode.RGB, apply_exif_orientation=True).to(device)
                except RuntimeError as e:
                    decoded[i] = e  # type: ignore[assignment]
    rows, kept, failed = [], [], []
    planned = {}
    ok_jpeg = [i for i in jpeg_at if isinstance(decoded.get(i), torch.Tensor)]
    if ok_jpeg:
        planned = dict(zip(ok_jpeg, plan([decoded[i] for i in ok_jpeg]), strict=True))
    for i, (kind, x) in enumerate(payloads):
        if kind == "cpu":
            rows.append(x.to(device))
        elif i in planned:
            rows.append(planned[i])
        else:
            failed.append((keys[i], f"cannot decode ({decoded.get(i)})"))
            continue
        kept.append(keys[i])
    return (torch.stack(rows) if rows else None), kept, failed
