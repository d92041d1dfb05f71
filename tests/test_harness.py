"""lm-eval's own CLI on a saved Q-Sparse checkpoint (`qsparse_hf.harness`), and the shipped task from any folder."""

import json
import subprocess
import sys

import pytest
from conftest import EMBEDDED_MODEL

pytest.importorskip("lm_eval")


def _saved_sparse_checkpoint(folder):
    from qsparse_hf.cli import main

    assert main(["convert", str(EMBEDDED_MODEL), "--topk", "0.5", "--output", str(folder), "--dtype", "float32"]) == 0
    return folder


def _harness(command, ckpt, cwd, output=None):
    args = [*command, "--model", "hf", "--model_args", f"pretrained={ckpt},dtype=float32", "--tasks",
            "openorca_definitions", "--limit", "6", "--device", "cpu"]
    if output is not None:
        args += ["--output_path", str(output)]
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_harness_cli_evaluates_a_sparse_checkpoint_from_any_folder(tmp_path):
    from qsparse_hf.tasks import task_include_path

    ckpt = _saved_sparse_checkpoint(tmp_path / "ckpt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = _harness([sys.executable, "-m", "qsparse_hf.harness"], ckpt, elsewhere, output=tmp_path / "results")
    assert run.returncode == 0, run.stderr[-2000:]
    files = list((tmp_path / "results").rglob("results_*.json"))
    assert files, run.stdout[-2000:]
    scores = json.loads(files[0].read_text())["results"]["openorca_definitions"]
    assert 0.0 <= scores["acc,none"] <= 1.0

    # The plain harness cannot parse the qsparse config (transformers knows it only after `import qsparse_hf`),
    # while the task itself, given by --include_path, finds its data from this folder.
    plain = _harness([sys.executable, "-m", "lm_eval", "--include_path", task_include_path()], ckpt, elsewhere)
    assert plain.returncode != 0 and "qsparse" in plain.stderr + plain.stdout


def test_harness_adds_the_task_folder_only_when_none_is_given():
    from qsparse_hf.harness import harness_argv
    from qsparse_hf.tasks import task_include_path

    assert harness_argv(["--tasks", "x"]) == ["--tasks", "x", "--include_path", task_include_path()]
    assert harness_argv(["--include_path=/mine"]) == ["--include_path=/mine"]
