"""Images: class folders of PNG/JPEG files decoded safely, and the ``preprocess`` job setting.

**Class folders.** :func:`read_image_folder` reads a zip or tar archive (or a folder) holding one
folder per class, optionally inside one wrapping folder (``pets/cat/1.png``, ``pets/dog/2.jpg``).
Classes are the folder names, sorted; their index is the target. Every image is decoded by
Pillow into RGB (grey, palette, CMYK converted; alpha dropped; 16-bit grey scaled) and resized to
one size: ``size`` or the most common one. :func:`dns_core.data.load_image_folder` wraps it into
a :class:`~dns_core.data.Dataset` of N×3×H×W floats in [0, 1].

What is skipped: hidden files and folders (a name starting with ``.``: ``.DS_Store``, ``._x``),
``__MACOSX/``, ``Thumbs.db``, ``desktop.ini``, and files beside the class folders that are not
images (a ``README``, a ``LICENSE``). What is refused (:class:`~dns_core.uploads.InvalidFile`):
images beside the class folders, folders inside a class folder, a file in a class folder that is
not a .png/.jpg/.jpeg, fewer than two classes (these as :class:`FolderLayoutError`), a file whose
content is not PNG or JPEG and an image Pillow cannot decode. Decompression bombs are refused
(:class:`~dns_core.uploads.FileTooLarge`) from the image's header, before a pixel is decoded: each
image has at most ``max_pixels_per_image`` pixels and all of them together ``max_total_pixels``;
Pillow's own guard (``Image.MAX_IMAGE_PIXELS``) is set to the same cap while we decode, and its
warning is an error.

**Preprocess.** :class:`Preprocess` is the job setting ``"preprocess"``: convert the channels,
resize the shorter side, crop the centre square and normalise, applied to image data in [0, 1].
Importing this module does not import torch (the job spec validates the setting with it); the
functions that work on tensors import it when called.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import ConfigError
from .uploads import MAX_EXPANDED_BYTES, FileTooLarge, InvalidFile

if TYPE_CHECKING:
    import torch
    from PIL import Image as PILImage

    from .data import Dataset
    from .inputs import ModelInput

#: Caps of :func:`read_image_folder`. One image: 4096×4096 pixels; all images: 150 M pixels
#: decoded; the result: 2 GiB of floats (N×3×H×W×4 bytes); the archive: 100,000 entries.
MAX_PIXELS_PER_IMAGE = 4096 * 4096
MAX_TOTAL_PIXELS = 150_000_000
MAX_OUTPUT_BYTES = 2 * 1024**3
MAX_IMAGE_FILES = 100_000
#: Image files are already compressed: an entry that expands this much is not an image.
MAX_IMAGE_RATIO = 50.0

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_JUNK = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
_FORMATS = ("PNG", "JPEG")


class FolderLayoutError(InvalidFile):
    """An archive that is not class folders of PNG/JPEG images (:func:`dns_core.data.load_data_file`
    reports it as a DataError)."""


def _skipped(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p in _JUNK for p in parts)


def _list_folder(root: Path, max_files: int) -> list[str]:
    """The regular files under ``root`` (a user's own folder), never following a link."""
    names: list[str] = []
    for top, dirs, files in os.walk(root, followlinks=False):
        for name in [*dirs, *files]:
            full = Path(top) / name
            rel = full.relative_to(root).as_posix()
            if full.is_symlink():
                raise InvalidFile(f"{root.name}: {rel} is a link; only files and folders are read")
            if name in files:
                if not full.is_file():
                    raise InvalidFile(f"{root.name}: {rel} is not a regular file")
                names.append(rel)
                if len(names) > max_files:
                    raise FileTooLarge(f"{root.name}: more than {max_files:,} files")
    return sorted(names)


def _layout(names: list[str], where: str) -> tuple[list[tuple[str, str]], list[str]]:
    """``[(class, relative path)]`` sorted, and the sorted classes, from the files of an image folder."""
    parts = [tuple(n.split("/")) for n in names]
    parts = [p for p in parts if not _skipped(p)]
    prefix: tuple[str, ...] = ()

    # strip wrapping folders (pets/train/cat/1.png -> cat/1.png) while every file lies deeper than class/file
    def image(p: tuple[str, ...]) -> bool:
        return p[-1].lower().endswith(IMAGE_SUFFIXES)

    if not any(image(p) for p in parts):
        raise FolderLayoutError(f"{where}: holds no PNG or JPEG images; data as an archive is one folder "
                                "of images per class (cat/1.png, dog/2.jpg, ...)")  # fmt: skip
    while (
        any(image(p) for p in parts)
        and all(len(p) > 2 for p in parts if image(p))
        and all(len(p) > 1 for p in parts)
        and len({p[0] for p in parts}) == 1
    ):
        prefix += (parts[0][0],)
        parts = [p[1:] for p in parts]
    items: list[tuple[str, str]] = []
    for p in parts:
        rel = "/".join(prefix + p)
        is_image = image(p)
        if len(p) == 1:
            if is_image:
                raise FolderLayoutError(f"{where}: {rel} lies beside the class folders; put each image in the folder "
                                  "of its class (cat/1.png, dog/2.png, ...)")  # fmt: skip
            continue  # a README or LICENSE beside the class folders
        if len(p) > 2:
            raise FolderLayoutError(f"{where}: {rel} is in a folder inside the class folder {p[0]!r}; "
                              "put the images of a class directly in its folder")  # fmt: skip
        if not is_image:
            raise FolderLayoutError(f"{where}: {rel} is not a PNG or JPEG image (.png, .jpg, .jpeg); remove it")
        items.append((p[0], rel))
    classes = sorted({c for c, _ in items})
    if len(classes) < 2:
        found = f"one class folder ({classes[0]!r})" if classes else "no images in class folders"
        raise FolderLayoutError(f"{where}: found {found}; an image data set needs one folder per class, "
                          "at least two (cat/1.png, dog/2.png, ...)")  # fmt: skip
    return sorted(items), classes


@contextmanager
def _bomb_guard(max_pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb guard set to ``max_pixels``, its warning an error (process-wide while
    it lasts: decode one image set at a time per process)."""
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def _open(path: Path, rel: str, where: str, max_pixels: int) -> PILImage.Image:
    """The image's header read (no pixel decoded) and its size checked against the cap."""
    from PIL import Image

    try:
        im = Image.open(path, formats=_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise FileTooLarge(f"{where}: {rel} claims more pixels than the {max_pixels:,} allowed per image "
                           f"(a decompression bomb? {e})") from None  # fmt: skip
    except Exception as e:  # Pillow raises many types on hostile input (UnidentifiedImageError, SyntaxError, ...)
        raise InvalidFile(f"{where}: {rel} is not a readable PNG or JPEG image ({type(e).__name__}: {e})") from None
    w, h = im.size
    if w < 1 or h < 1 or w * h > max_pixels:
        im.close()
        raise FileTooLarge(f"{where}: {rel} is {w}×{h} pixels, more than the {max_pixels:,} allowed per image")
    return im


def _decode(path: Path, rel: str, where: str, max_pixels: int, width: int, height: int) -> Any:
    """One image decoded to a height×width×3 float32 numpy array in [0, 1]."""
    import numpy as np
    from PIL import Image, ImageOps

    im = _open(path, rel, where, max_pixels)
    try:
        with im:
            if im.format == "JPEG":
                im.draft("RGB", (width, height))  # decode at a reduced scale when much larger: less memory
            im.load()
            im = ImageOps.exif_transpose(im)
            scale = 255.0
            if im.mode.startswith("I") or im.mode == "F":  # 16- or 32-bit grey: keep the precision
                scale = 1.0 if im.mode == "F" else 65535.0
                im = im.convert("F")
            elif im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA").convert("RGB")
            else:  # L, LA, RGBA, CMYK, YCbCr, P, 1: RGB; alpha dropped
                im = im.convert("RGB")
            if im.size != (width, height):
                im = im.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(im, dtype=np.float32) / scale
    except (FileTooLarge, InvalidFile):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise FileTooLarge(f"{where}: {rel} holds more pixels than the {max_pixels:,} allowed per image "
                           f"(a decompression bomb? {e})") from None  # fmt: skip
    except Exception as e:  # truncated or corrupt data fails in Pillow's decoders with many error types
        raise InvalidFile(f"{where}: {rel} cannot be decoded ({type(e).__name__}: {e})") from None
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return np.clip(pixels, 0.0, 1.0)


def read_image_folder(
    path: str | os.PathLike[str],
    *,
    max_pixels_per_image: int = MAX_PIXELS_PER_IMAGE,
    max_total_pixels: int = MAX_TOTAL_PIXELS,
    size: int | tuple[int, int] | None = None,
    max_files: int = MAX_IMAGE_FILES,
    max_expanded: int = MAX_EXPANDED_BYTES,
    max_output_bytes: int = MAX_OUTPUT_BYTES,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(inputs N×3×H×W float32 in [0, 1], targets int64, classes) from an archive or folder of class folders.

    ``size`` is the output's side (an int: square) or (height, width); by default the most common
    image size. See the module's docstring for what is skipped and refused.
    """
    p = Path(path)
    where = p.name
    if p.is_dir():
        return _read_root(p, _list_folder(p, max_files), where, max_pixels_per_image, max_total_pixels, size,
                          max_output_bytes)  # fmt: skip
    from .archives import archive_kind, extract_archive

    if archive_kind(p) is None:
        raise InvalidFile(f"{where}: class folders of images come as a zip or tar archive")
    with tempfile.TemporaryDirectory(prefix="netsurgery-images-") as tmp:
        names = extract_archive(p, Path(tmp), max_entries=max_files, max_expanded=max_expanded,
                                max_ratio=MAX_IMAGE_RATIO)  # fmt: skip
        return _read_root(Path(tmp), names, where, max_pixels_per_image, max_total_pixels, size, max_output_bytes)


def _read_root(
    root: Path,
    names: list[str],
    where: str,
    max_pixels: int,
    max_total: int,
    size: int | tuple[int, int] | None,
    max_output_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    import torch

    items, classes = _layout(names, where)
    sizes: list[tuple[int, int]] = []
    total = 0
    with _bomb_guard(max_pixels):
        for _, rel in items:  # pass 1: headers only
            with _open(root / rel, rel, where, max_pixels) as im:
                w, h = im.size
            total += w * h
            if total > max_total:
                raise FileTooLarge(f"{where}: the images hold more than {max_total:,} pixels in all "
                                   f"(at {rel}); upload fewer or smaller images")  # fmt: skip
            sizes.append((w, h))
        if size is None:
            width, height = Counter(sizes).most_common(1)[0][0]
        elif isinstance(size, int):
            width = height = size
        else:
            height, width = size
        if width < 1 or height < 1:
            raise ConfigError(f"image size {height}×{width} must be positive")
        need = len(items) * 3 * height * width * 4
        if need > max_output_bytes:
            raise FileTooLarge(f"{where}: {len(items):,} images at 3×{height}×{width} take {need:,} bytes, more "
                               f"than the {max_output_bytes:,} allowed; use smaller images or fewer")  # fmt: skip
        out = torch.empty((len(items), 3, height, width), dtype=torch.float32)
        for i, (_, rel) in enumerate(items):  # pass 2: decode
            out[i] = torch.from_numpy(_decode(root / rel, rel, where, max_pixels, width, height)).permute(2, 0, 1)
    index = {c: i for i, c in enumerate(classes)}
    targets = torch.tensor([index[c] for c, _ in items], dtype=torch.int64)
    return out, targets, classes


# --------------------------------------------------------------------------------------------------
# Tensor operations on images in [0, 1]


def convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """N×C×H×W images made ``channels`` channels: grey replicated, RGB(A) to grey by luminance
    (ITU-R 601), alpha dropped. Raises ConfigError for any other conversion."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 4:
        x, c = x[:, :3], 3
        if channels == 3:
            return x
    if c == 1:
        return x.expand(-1, channels, -1, -1).contiguous()
    if c == 3 and channels == 1:
        weights = x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (x * weights).sum(1, keepdim=True)
    raise ConfigError(f"cannot convert images of {x.shape[1]} channels to {channels}")


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    import torch

    if x.shape[-2:] == (height, width):
        return x
    shrink = height < x.shape[-2] or width < x.shape[-1]
    out = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False,
                                          antialias=shrink)  # fmt: skip
    return out.clamp_(0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# The "preprocess" job setting

_KEYS = ("resize", "crop", "mean", "std", "channels")
MAX_SIDE = 4096
_CHUNK_ELEMENTS = 16 * 1024 * 1024  # values processed at a time (64 MB of floats)


def _side(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIDE:
        raise ConfigError(f"preprocess {name} must be a whole number of pixels from 1 to {MAX_SIDE}, got {value!r}")
    return value


def _stats(name: str, value: object) -> tuple[float, ...] | Literal["model"] | None:
    if value is None or value == "model":
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not 1 <= len(value) <= 4:
        raise ConfigError(f'preprocess {name} must be 1 to 4 numbers (one per channel) or "model", got {value!r}')
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"preprocess {name} must hold finite numbers, got {v!r}")
        if name == "std" and v <= 0:
            raise ConfigError(f"preprocess std must be positive, got {v!r}")
        if abs(v) > 1e6:
            raise ConfigError(f"preprocess {name} value {v!r} is out of range")
        out.append(float(v))
    return tuple(out)


@dataclass(frozen=True)
class Preprocess:
    """How image data (values in [0, 1]) is prepared for the model, in this order: ``channels``
    (1 or 3: grey replicated, RGB to grey by luminance, alpha dropped), ``resize`` (the shorter side
    to this many pixels, the aspect kept), ``crop`` (the centre square of this side), then
    ``(x - mean) / std`` per channel (one value, or one per channel; ``"model"``: the model's own,
    filled in by :meth:`resolve`). Every field is optional."""

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] | Literal["model"] | None = None
    std: tuple[float, ...] | Literal["model"] | None = None
    channels: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "resize", _side("resize", self.resize))
        object.__setattr__(self, "crop", _side("crop", self.crop))
        object.__setattr__(self, "mean", _stats("mean", self.mean))
        object.__setattr__(self, "std", _stats("std", self.std))
        if self.channels is not None and (isinstance(self.channels, bool) or self.channels not in (1, 3)):
            raise ConfigError(f"preprocess channels must be 1 or 3, got {self.channels!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, tuple) and self.channels is not None and len(value) not in (1, self.channels):
                raise ConfigError(f"preprocess {name} has {len(value)} values for {self.channels} channels")

    @classmethod
    def from_json(cls, obj: object) -> Preprocess:
        """From the job's JSON (``{"resize": 256, "crop": 224, "mean": "model", ...}``); unknown keys,
        wrong types and values out of bounds raise ConfigError."""
        if isinstance(obj, Preprocess):
            return obj
        if not isinstance(obj, Mapping):
            raise ConfigError(f"preprocess must be a JSON object, got {type(obj).__name__}")
        unknown = sorted(str(k) for k in obj if k not in _KEYS)
        if unknown:
            raise ConfigError(f"unknown key(s) in preprocess: {', '.join(unknown)}; known: {', '.join(_KEYS)}")
        return cls(**{k: obj[k] for k in _KEYS if obj.get(k) is not None})

    def to_json(self) -> dict[str, Any]:
        """The JSON form (the fields that are set)."""
        out: dict[str, Any] = {}
        for k in _KEYS:
            v = getattr(self, k)
            if v is not None:
                out[k] = list(v) if isinstance(v, tuple) else v
        return out

    def resolve(self, model_input: ModelInput | None) -> Preprocess:
        """``"model"`` mean/std replaced by the model's (``model_input.mean``/``std``); ConfigError if
        the model does not say."""
        changes: dict[str, tuple[float, ...]] = {}
        for name in ("mean", "std"):
            if getattr(self, name) == "model":
                value = getattr(model_input, name, None) if model_input is not None else None
                if value is None:
                    raise ConfigError(f'preprocess {name} is "model" but the model\'s files give no {name}; '
                                      "give the numbers instead")  # fmt: skip
                changes[name] = tuple(float(v) for v in value)
        return replace(self, **changes) if changes else self  # type: ignore[arg-type]

    def output_shape(self, channels: int, height: int, width: int) -> tuple[int, int, int]:
        """The per-example shape after this preprocessing of C×H×W images."""
        c = self.channels or channels
        h, w = height, width
        if self.resize is not None:
            if h <= w:
                h, w = self.resize, max(1, round(w * self.resize / h))
            else:
                h, w = max(1, round(h * self.resize / w)), self.resize
        if self.crop is not None:
            if self.crop > min(h, w):
                raise ConfigError(f"preprocess crop {self.crop} is larger than the images ({h}×{w}"
                                  f"{' after resizing' if self.resize else ''})")  # fmt: skip
            h = w = self.crop
        return c, h, w

    def apply(self, ds: Dataset, *, max_bytes: int = MAX_OUTPUT_BYTES) -> Dataset:
        """The preprocessed copy of ``ds`` (float N×C×H×W images in [0, 1]); targets unchanged.

        ConfigError if ``ds`` is not such image data (token sequences, features, or values outside
        [0, 1], i.e. already normalised), if "model" was not resolved, or if the result would take
        more than ``max_bytes``.
        """
        import torch

        if "model" in (self.mean, self.std):
            raise ConfigError('preprocess mean/std "model" must be resolved against the model first')
        x = ds.inputs
        if x.dim() != 4 or not x.is_floating_point():
            raise ConfigError(f"preprocess applies to images (float N×C×H×W); this data is {x.dtype} "
                              f"{list(x.shape)}")  # fmt: skip
        if len(x) and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
            raise ConfigError(f"preprocess expects image values in [0, 1]; this data holds values from "
                              f"{float(x.min()):.3g} to {float(x.max()):.3g} (already normalised?)")  # fmt: skip
        c, h, w = self.output_shape(x.shape[1], x.shape[2], x.shape[3])
        need = len(x) * c * h * w * 4
        if need > max_bytes:
            raise ConfigError(f"preprocessed, the data would take {need:,} bytes (N={len(x):,} at {c}×{h}×{w}), "
                              f"more than the {max_bytes:,} allowed")  # fmt: skip
        stats = []
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) not in (1, c):
                raise ConfigError(f"preprocess {name} has {len(value)} values for {c}-channel images")
            stats.append(None if value is None else torch.tensor(value, dtype=torch.float32).view(1, -1, 1, 1))
        mean, std = stats
        out = torch.empty((len(x), c, h, w), dtype=torch.float32)
        _, rh, rw = Preprocess(resize=self.resize).output_shape(c, x.shape[2], x.shape[3])
        step = max(1, _CHUNK_ELEMENTS // max(x[0].numel(), c * rh * rw, 1))
        for i in range(0, len(x), step):
            chunk = convert_channels(x[i : i + step].to(torch.float32), c)
            if self.resize is not None:
                chunk = _resize(chunk, rh, rw)
            if self.crop is not None:
                top, left = (chunk.shape[2] - self.crop) // 2, (chunk.shape[3] - self.crop) // 2
                chunk = chunk[:, :, top : top + self.crop, left : left + self.crop]
            if mean is not None:
                chunk = chunk - mean
            if std is not None:
                chunk = chunk / std
            out[i : i + step] = chunk
        return replace(ds, inputs=out)
