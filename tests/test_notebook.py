"""examples/quickstart.ipynb runs top to bottom (nbclient) on the embedded model and the Open-Orca sample."""

import os

import pytest
from conftest import REPO, fixture_path

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def test_quickstart_notebook_executes_and_shows_the_report_and_heatmap(monkeypatch):
    monkeypatch.setenv("QSPARSE_SFT_DATA", str(fixture_path("open-orca-sample/train.jsonl")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(REPO / "examples" / "quickstart.ipynb", as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells), "commit the notebook without outputs"
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "examples")}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert markdown and "| q | k | v | o |" in markdown[0]  # the report renders as a table
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the heatmap, inline
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "reloaded sparse: True | identical logits: True" in text
    assert os.environ["QSPARSE_SFT_DATA"] in text
