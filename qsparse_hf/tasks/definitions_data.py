"""Data loader of the ``openorca_definitions`` lm-eval task (referenced from its YAML as ``!function``).

The harness resolves a YAML's relative ``data_files`` against the working directory; a loader that reads the file
beside this module finds it from anywhere, including lm-eval's own CLI with ``--include_path``.
"""

from __future__ import annotations

from pathlib import Path

DATA_FILE = Path(__file__).resolve().parent / "openorca_definitions.jsonl"


def load(**_metadata):
    """The task's dataset (a ``datasets.DatasetDict`` with one ``test`` split); lm-eval passes the YAML's metadata.

    Example:
        >>> len(load(version=1.0)["test"]) > 0  # doctest: +SKIP
        True
    """
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(DATA_FILE)})
