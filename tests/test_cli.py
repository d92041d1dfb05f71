"""The qsparse command line on the embedded fixture model (always present in the repo)."""

import json
import subprocess
import sys

import pytest
from conftest import EMBEDDED_MODEL, REPO

from qsparse_hf import QSparseLinear
from qsparse_hf.cli import main

TEXT = REPO / "examples" / "data" / "sample_text.txt"


def test_scaling_prints_optimum_and_size(capsys):
    assert main(["scaling", "--budget", "7e9"]) == 0
    out = capsys.readouterr().out
    assert "S* = 45.58%" in out and "1.84x" in out
    main(["scaling", "--printed-constants"])
    assert "S* = 50.24%" in capsys.readouterr().out


def test_convert_then_report(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out_dir = tmp_path / "sparse"
    assert main(["convert", str(EMBEDDED_MODEL), "--topk", "0.5", "--output", str(out_dir), "--dtype", "float32"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert isinstance(model.model.layers[0].mlp.up_proj, QSparseLinear)
    report_json, heatmap = tmp_path / "r.json", tmp_path / "h.png"
    assert main(["report", str(out_dir), "--text-file", str(TEXT), "--json", str(report_json), "--plot", str(heatmap)]) == 0
    report = json.loads(report_json.read_text())
    assert report["per_projection"]["q"] == pytest.approx(0.5)
    assert heatmap.stat().st_size > 1000
    assert "activated linear params" in capsys.readouterr().out


def test_report_on_a_dense_model_needs_topk():
    with pytest.raises(SystemExit, match="--topk"):
        main(["report", str(EMBEDDED_MODEL), "--text-file", str(TEXT)])


def test_console_script_errors_cleanly_on_a_missing_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qsparse_hf.cli", "convert", str(tmp_path / "nope"), "--output",
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode != 0 and "cannot load" in proc.stderr
