"""The decode GEMVs' tuned launches, remembered across processes.

At the first inference forward on a GPU the GEMV tuners (`gemv.choose_config`, `ffn.gated_config`) time their
candidate launches for every projection shape of the model: a few hundred timings for a 7B model, seconds of
waiting (plus Triton's first compiles) before the first token. The picks are stored in a JSON file, as Triton's
autotuner does with ``cache_results``, and a later process on the same kind of GPU, with the same kernels, reads
them back instead of timing again. An entry holds for one GPU model and compute capability, one Triton and torch
version, one version of the kernels' source and the programmatic-dependent-launch setting; anything else tunes
afresh.

``QSPARSE_TUNING_CACHE`` names the file (default ``$XDG_CACHE_HOME/qsparse_hf/gemv_tuning.json``, i.e. under
``~/.cache``); ``QSPARSE_TUNING_CACHE=0`` turns the file off (every process tunes). Deleting the file forgets
every pick. A file that cannot be read or written is reported once (a warning) and then left alone: tuning in the
process goes on as without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch

__all__ = ["cache_path", "tuned", "remembered", "remember"]

# The kernels whose source decides what a launch configuration means and how fast it is.
_SOURCES = ("gemv.py", "ffn.py", "launch.py", "topk.py")
_FINGERPRINTS: dict[torch.device, str] = {}
_ENTRIES: dict[str, list] | None = None
_WARNED: set[str] = set()


def cache_path() -> Path | None:
    """The tuning cache file, or None when ``QSPARSE_TUNING_CACHE=0`` turns it off.

    Example:
        >>> from unittest import mock
        >>> with mock.patch.dict(os.environ, {"QSPARSE_TUNING_CACHE": "/tmp/tuning.json"}):
        ...     str(cache_path())
        '/tmp/tuning.json'
        >>> with mock.patch.dict(os.environ, {"QSPARSE_TUNING_CACHE": "0"}):
        ...     cache_path() is None
        True
    """
    asked = os.environ.get("QSPARSE_TUNING_CACHE")
    if asked == "0":
        return None
    if asked:
        return Path(asked).expanduser()
    home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(home) / "qsparse_hf" / "gemv_tuning.json"


def _fingerprint(device: torch.device) -> str:
    """What a tuned launch holds for: the GPU model and compute capability, Triton's and torch's versions, the
    kernels' source and whether they launch as programmatic dependents."""
    found = _FINGERPRINTS.get(device)
    if found is None:
        import triton

        from .launch import pdl_enabled

        source = hashlib.sha256()
        for name in _SOURCES:
            source.update((Path(__file__).parent / name).read_bytes())
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            gpu = f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"
        else:
            gpu = device.type
        found = _FINGERPRINTS[device] = (f"{gpu} | triton {triton.__version__} | torch {torch.__version__} | "
                                         f"kernels {source.hexdigest()[:16]} | pdl {int(pdl_enabled())}")
    return found


def _entry_key(tuner: str, key: tuple, device: torch.device) -> str:
    # repr keeps dtypes, None and booleans apart; the device itself stays out: its fingerprint names what matters
    return f"{tuner} | {_fingerprint(device)} | {tuple(repr(part) for part in key)}"


def _warn_once(path: Path, action: str, error: Exception) -> None:
    if str(path) not in _WARNED:  # one warning per file: a folder that is not one fails reading and writing
        _WARNED.add(str(path))
        warnings.warn(f"qsparse_hf could not {action} its GEMV tuning cache {path} ({error}); tuning goes on without "
                      f"it. Set QSPARSE_TUNING_CACHE to a writable file, or to 0 to turn the cache off.", stacklevel=3)


def _read(path: Path) -> dict[str, list]:
    """The entries stored at ``path`` (none when there is no file yet, or one that is not a tuning cache)."""
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        _warn_once(path, "read", error)
        return {}
    if not isinstance(entries, dict):
        _warn_once(path, "read", ValueError("not a JSON object"))
        return {}
    return entries


def tuned(tuner: str, key: tuple, device: torch.device, time: Callable[[], tuple]) -> tuple:
    """``tuner``'s launch for ``key`` on a GPU like ``device``: the one an earlier process (or this one) stored,
    else ``time()``'s pick, stored for the next.

    Example:
        >>> tuned("gemv", shape, x.device, lambda: _fastest(candidates, default, run))  # doctest: +SKIP
        (64, 128, 16, 4, 3)
    """
    config = remembered(tuner, key, device)
    if config is None:
        config = time()
        remember(tuner, key, device, config)
    return config


def remembered(tuner: str, key: tuple, device: torch.device) -> tuple | None:
    """The launch configuration that ``tuner`` picked for ``key`` on a GPU like ``device`` in an earlier process
    (or this one), else None. The file is read once per process.

    Example:
        >>> remembered("gemv", (4096, 4096, 1, torch.bfloat16, 2048, True), torch.device("cuda"))  # doctest: +SKIP
        (64, 128, 16, 4, 3)
    """
    global _ENTRIES
    path = cache_path()
    if path is None:
        return None
    if _ENTRIES is None:
        _ENTRIES = _read(path)
    config = _ENTRIES.get(_entry_key(tuner, key, device))
    return tuple(config) if isinstance(config, list) and all(isinstance(v, int) for v in config) else None


def remember(tuner: str, key: tuple, device: torch.device, config: tuple) -> None:
    """Store ``tuner``'s pick ``config`` for ``key`` on a GPU like ``device``, merged into the file as it is now
    (other processes may have added entries) and written whole in one rename, so a reader never sees half a file.

    Example:
        >>> remember("gemv", (4096, 4096, 1, torch.bfloat16, 2048, True), torch.device("cuda"),
        ...          (64, 128, 16, 4, 3))  # doctest: +SKIP
    """
    global _ENTRIES
    path = cache_path()
    if path is None:
        return
    entry = _entry_key(tuner, key, device)
    entries = _read(path)
    entries[entry] = [int(v) for v in config]
    _ENTRIES = {**(_ENTRIES or {}), **entries}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False)
        try:
            with handle:
                json.dump(entries, handle, indent=0, sort_keys=True)
            os.replace(handle.name, path)
        except BaseException:
            Path(handle.name).unlink(missing_ok=True)
            raise
    except OSError as error:
        _warn_once(path, "write", error)
