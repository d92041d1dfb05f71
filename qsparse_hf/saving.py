"""All-or-nothing checkpoint writes, and finding the last complete Trainer checkpoint.

``save_pretrained`` writes ``config.json`` first and the weights after it, so a save killed half-way over an existing
checkpoint leaves the new config beside the old weights, which loads without a word. Everything qsparse_hf writes
itself goes through `save_pretrained_atomic`: the files are written into a staging folder beside the target, then
swapped in with the old ``config.json`` removed first and the new one moved in last. At every moment the folder
either loads as the old checkpoint, refuses to load (no config), or loads as the new one.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["save_pretrained_atomic", "write_directory_atomic", "last_complete_checkpoint", "holds_checkpoint"]

logger = logging.getLogger(__name__)

#: Files that make up a model in a checkpoint folder; old ones the new save does not rewrite are removed.
_MODEL_FILES = re.compile(
    r"^(config\.json|generation_config\.json|qsparse_packed\.json|adapter_config\.json|"
    r".*\.safetensors|.*\.safetensors\.index\.json|pytorch_model.*\.bin(\.index\.json)?|adapter_model\.bin)$"
)
_WEIGHT_FILES = re.compile(r"^(.*\.safetensors|.*\.safetensors\.index\.json|pytorch_model.*\.bin|adapter_model\.bin)$")


def holds_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` already holds a model (a ``config.json`` or weight files).

    Example:
        >>> holds_checkpoint("/nonexistent")
        False
    """
    path = Path(directory)
    return path.is_dir() and any(_MODEL_FILES.match(p.name) for p in path.iterdir())


def write_directory_atomic(directory: str | os.PathLike, write: Callable[[Path], object]):
    """Call ``write(staging_folder)``, then swap what it wrote into ``directory`` (created if needed); returns what
    ``write`` returned. If ``write`` raises, ``directory`` is left exactly as it was.

    Example:
        >>> import tempfile, json
        >>> target = Path(tempfile.mkdtemp()) / "ckpt"
        >>> _ = write_directory_atomic(target, lambda d: (d / "config.json").write_text("{}"))
        >>> sorted(p.name for p in target.iterdir())
        ['config.json']
    """
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        result = write(staging)
        target.mkdir(exist_ok=True)
        written = {p.name for p in staging.iterdir()}
        (target / "config.json").unlink(missing_ok=True)  # from here until the end the folder does not load
        for old in target.iterdir():
            if old.is_file() and _MODEL_FILES.match(old.name) and old.name not in written:
                old.unlink()  # e.g. the shard index of an earlier sharded save
        for name in sorted(written, key=lambda n: n == "config.json"):  # config.json last
            source, dest = staging / name, target / name
            if dest.is_dir() and not source.is_dir():
                shutil.rmtree(dest)
            elif source.is_dir() and dest.exists():
                shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
            os.replace(source, dest)
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_pretrained_atomic(model, directory: str | os.PathLike, tokenizer=None, **kwargs) -> Path:
    """``model.save_pretrained(directory, **kwargs)`` (and the tokenizer's), all-or-nothing.

    Example:
        >>> save_pretrained_atomic(model, "runs/sft", tokenizer=tokenizer)  # doctest: +SKIP
    """

    def write(staging: Path) -> None:
        model.save_pretrained(staging, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)

    write_directory_atomic(directory, write)
    return Path(directory)


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` under ``output_dir`` that a Trainer finished writing (trainer state and
    weights present), or None. Newer incomplete ones (a run killed while saving) are skipped with a warning.

    Example:
        >>> last_complete_checkpoint("/nonexistent") is None
        True
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = []
    for path in folder.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    for _, path in sorted(found, reverse=True):
        files = {p.name for p in path.iterdir()}
        if "trainer_state.json" in files and any(_WEIGHT_FILES.match(name) for name in files):
            return str(path)
        logger.warning("skipping %s: the run stopped before it was fully written", path)
    return None
