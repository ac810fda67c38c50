"""Models that are several files: a Hugging Face folder, or an ONNX graph with its external data.

A user brings such a model as an archive (zip or tar) or as several files; either way the files land
in one folder, which :func:`classify_folder` recognises:

- ``config.json`` at the top: a Hugging Face folder (:mod:`dns_core.hf`). What is kept: the
  config, the safetensors weights (one file, or an index and its shards) and the small side files
  a Hub folder holds for preprocessing and tokenising (:data:`HF_SIDE_FILES`). Anything else in it
  (``pytorch_model.bin``, TensorFlow or Flax weights, an ``onnx/`` folder) is never read.
- exactly one ``*.onnx`` at the top: an ONNX graph whose external data (``model.onnx.data``)
  lies beside it; every top-level file is kept.

:func:`write_bundle` stores the kept files, flat, in one uncompressed zip: the form in which the
service keeps such a model and the worker gets it back (:func:`open_bundle`). Nothing here reads a
model: the format's own checks (:func:`dns_core.hf.inspect_hf_folder`,
:func:`dns_core.onnx_convert.check_onnx`) decide whether it is accepted.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .archives import extract_archive
from .uploads import InvalidFile

#: Hugging Face side files kept with the weights: preprocessing and tokeniser configs (text only).
HF_SIDE_FILES = frozenset(
    {
        "preprocessor_config.json", "processor_config.json", "image_processor_config.json",
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
        "vocab.txt", "vocab.json", "merges.txt", "generation_config.json",
    }
)  # fmt: skip
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
#: What a folder holding neither layout is told.
EXPECTED = (
    "a model of several files is a Hugging Face folder (config.json and model.safetensors, plus any "
    "preprocessor or tokenizer config) or an ONNX graph with its external data (model.onnx and "
    "model.onnx.data)"
)


@dataclass(frozen=True)
class ModelFolder:
    """A recognised folder: its ``kind``, its ``root``, the file the format starts from (``main``:
    ``config.json`` or the ``.onnx`` graph) and the ``files`` (relative to ``root``) that make it up."""

    kind: Literal["hf", "onnx"]
    root: Path
    main: Path
    files: tuple[str, ...]


def _top_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_file() and not p.is_symlink())


def _single_subfolder(root: Path) -> Path:
    """``root``, or the one folder that wraps everything in it (``bert-tiny/config.json``)."""
    while True:
        entries = [p for p in root.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX"]
        if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
            root = entries[0]
        else:
            return root


def classify_folder(folder: Path) -> ModelFolder:
    """Which multi-file layout ``folder`` holds; :class:`~dns_core.uploads.InvalidFile` if neither."""
    root = _single_subfolder(folder)
    top = _top_files(root)
    if HF_CONFIG in top:
        files = [HF_CONFIG]
        if HF_INDEX in top:
            files.append(HF_INDEX)
            files += [n for n in top if n.endswith(".safetensors") and n.startswith("model-")]
        elif HF_WEIGHTS in top:
            files.append(HF_WEIGHTS)
        files += [n for n in top if n in HF_SIDE_FILES]
        return ModelFolder("hf", root, root / HF_CONFIG, tuple(files))
    graphs = [n for n in top if n.endswith(".onnx")]
    if len(graphs) == 1:
        return ModelFolder("onnx", root, root / graphs[0], tuple(top))
    if len(graphs) > 1:
        raise InvalidFile(f"{len(graphs)} ONNX graphs ({', '.join(graphs[:5])}): upload one model at a time")
    listed = ", ".join(top[:10]) or "no files at the top level"
    raise InvalidFile(f"not a model folder ({listed}): {EXPECTED}")


def write_bundle(model: ModelFolder, out: Path) -> Path:
    """The kept files of ``model``, flat, in one uncompressed zip at ``out``."""
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in model.files:
            zf.write(model.root / name, name)
    return out


def open_bundle(path: str | os.PathLike[str], dest: Path, **caps: int | float) -> ModelFolder:
    """Extract a model archive (a bundle, or a user's zip or tar) into ``dest`` and recognise it."""
    extract_archive(Path(path), dest, **caps)  # type: ignore[arg-type]
    return classify_folder(dest)
