"""A small local lm-eval task shipped with the package, so `qsparse eval` can compare dense and sparse models with
no network: ``openorca_definitions``, pick the right definition of a word among four.

Built from the Open-Orca-schema validation split of the project's fixtures (`build_definitions_task`); the three
wrong choices are definitions of other words. Metrics: ``acc`` and ``acc_norm`` (length-normalised).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = ["TASK_NAME", "TASK_DIR", "build_definitions_task", "task_include_path"]

TASK_NAME = "openorca_definitions"
TASK_DIR = Path(__file__).resolve().parent


def build_definitions_task(validation_jsonl: str | Path, output: str | Path, rows: int = 400, seed: int = 0) -> int:
    """Write the multiple-choice JSONL (``question``, ``choices``, ``label``) from Open-Orca-schema rows.

    Example:
        >>> import tempfile, json
        >>> src = Path(tempfile.mkdtemp()) / "val.jsonl"
        >>> _ = src.write_text("\\n".join(json.dumps({"question": f"Define w{i}", "response": f"sense {i}"})
        ...                              for i in range(6)))
        >>> out = src.with_name("task.jsonl"); build_definitions_task(src, out, rows=2)
        2
        >>> item = json.loads(out.read_text().splitlines()[0]); item["choices"][item["label"]]
        'sense 0'
    """
    items = [json.loads(line) for line in Path(validation_jsonl).read_text().splitlines() if line.strip()]
    if len(items) < 4:
        raise ValueError(f"{validation_jsonl} has {len(items)} rows; four are needed to make one question")
    rng = random.Random(seed)
    written = []
    for index, item in enumerate(items[:rows]):
        others = rng.sample([j for j in range(len(items)) if items[j]["response"] != item["response"]], 3)
        choices = [item["response"]] + [items[j]["response"] for j in others]
        order = list(range(4))
        rng.shuffle(order)
        written.append({"id": item.get("id", index), "question": item["question"],
                        "choices": [choices[o] for o in order], "label": order.index(0)})
    Path(output).write_text("".join(json.dumps(w) + "\n" for w in written))
    return len(written)


def task_include_path() -> str:
    """The folder to give lm-eval (``TaskManager(include_path=...)`` or its CLI's ``--include_path``) for the tasks
    shipped here; they find their data from any working directory.

    Example:
        >>> (Path(task_include_path()) / "openorca_definitions.yaml").exists()
        True
    """
    return str(TASK_DIR)
