"""The qsparse command line on the embedded fixture model (always present in the repo)."""

import json
import subprocess
import sys

import pytest
from conftest import EMBEDDED_MODEL, REPO, fixture_path

from qsparse_hf import QSparseLinear
from qsparse_hf.cli import main

TEXT = REPO / "examples" / "data" / "sample_text.txt"


def test_scaling_prints_optimum_and_size(capsys):
    assert main(["scaling", "--budget", "7e9"]) == 0
    out = capsys.readouterr().out
    assert "S* = 45.58%" in out and "1.84x" in out
    main(["scaling", "--printed-constants"])
    assert "S* = 50.24%" in capsys.readouterr().out


VALIDATION = "open-orca-sample/validation.jsonl"


def test_convert_then_report(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out_dir = tmp_path / "sparse"
    assert main(["convert", str(EMBEDDED_MODEL), "--topk", "0.5", "--output", str(out_dir), "--dtype", "float32"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert isinstance(model.model.layers[0].mlp.up_proj, QSparseLinear)
    card = (out_dir / "README.md").read_text()
    assert "import qsparse_hf" in card and "qsparse" in card and "topk | 0.5" in card
    report_json, heatmap = tmp_path / "r.json", tmp_path / "h.png"
    assert main(["report", str(out_dir), "--text-file", str(TEXT), "--samples", "2", "--json", str(report_json),
                 "--plot", str(heatmap)]) == 0
    report = json.loads(report_json.read_text())["qsparse"]
    assert report["per_projection"]["q"] == pytest.approx(0.5)
    assert heatmap.stat().st_size > 1000
    assert "activated linear params" in capsys.readouterr().out


def test_report_on_a_dataset_with_dense_baseline(tmp_path, capsys):
    data = fixture_path(VALIDATION)
    out = tmp_path / "r.json"
    code = main(["report", str(fixture_path("mistral-tiny")), "--topk", "0.7", "--dataset", str(data),
                 "--samples", "4", "--dense-baseline", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["samples"] == 4
    assert result["qsparse"]["per_projection"]["q"] == pytest.approx(0.3, abs=0.01)  # K = floor(0.7 * 256)
    # A SiLU model has (almost) no natural zeros: the baseline shows what Q-Sparse adds.
    assert result["dense_baseline"]["overall"] < 0.01
    assert "Dense baseline" in capsys.readouterr().out


def test_report_on_a_dense_model_needs_topk(capsys):
    assert main(["report", str(EMBEDDED_MODEL), "--text-file", str(TEXT)]) == 2
    assert "--topk" in capsys.readouterr().err


def test_eval_local_task_and_perplexity_against_base(tmp_path, capsys):
    out = tmp_path / "scores.json"
    code = main(["eval", str(EMBEDDED_MODEL), "--topk", "0.5", "--compare", str(EMBEDDED_MODEL),
                 "--tasks", "openorca_definitions", "--limit", "20", "--perplexity", str(TEXT), "--max-blocks", "2",
                 "--json", str(out)])
    assert code == 0
    columns = json.loads(out.read_text())
    sparse, dense = columns.values()
    assert 0.0 <= sparse["openorca_definitions/acc"] <= 1.0 and "openorca_definitions/acc_norm" in dense
    assert sparse["perplexity"] > dense["perplexity"] > 1.0  # top-K 50% without training costs perplexity
    assert "| perplexity |" in capsys.readouterr().out


def test_eval_loads_a_saved_checkpoint_through_the_harness(tmp_path):
    # A saved Q-Sparse checkpoint goes through lm-eval's own from_pretrained, which must come back sparse.
    ckpt = tmp_path / "ckpt"
    assert main(["convert", str(EMBEDDED_MODEL), "--topk", "0.5", "--output", str(ckpt), "--dtype", "float32"]) == 0
    out = tmp_path / "s.json"
    assert main(["eval", str(ckpt), "--tasks", "openorca_definitions", "--limit", "8", "--json", str(out)]) == 0
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(ckpt), device="cpu", dtype="float32")
    assert any(isinstance(m, QSparseLinear) for m in lm.model.modules())


@pytest.mark.parametrize("argv,code,message", [
    (["eval", str(EMBEDDED_MODEL), "--tasks", "no_such_task"], 2, "unknown lm-eval task"),
    (["eval", str(EMBEDDED_MODEL)], 2, "nothing to evaluate"),
    (["eval", "./does/not/exist", "--perplexity", "x.txt"], 2, "not found"),
    (["eval", str(EMBEDDED_MODEL), "--perplexity", "/no/such/file.txt"], 2, "cannot read text file"),
])
def test_eval_errors_say_what_went_wrong(argv, code, message, capsys):
    assert main(argv) == code
    assert message in capsys.readouterr().err


def test_not_a_causal_lm_is_refused(tmp_path, capsys):
    from transformers import DistilBertConfig

    DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64).save_pretrained(tmp_path)
    assert main(["report", str(tmp_path), "--topk", "0.5", "--text-file", str(TEXT)]) == 2
    assert "not a causal LM" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU message")
def test_bench_without_gpu_exits_3(capsys):
    assert main(["bench"]) == 3
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_compiled_host_runs_on_a_cpu_with_the_interpreter(tmp_path, monkeypatch):
    # The one benchmark that needs no GPU: the CLI switches Triton's interpreter on for its process.
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.delenv("QSPARSE_KERNELS", raising=False)
    assert main(["bench", "compiled_host", "--cpu", "--layers", "1", "--calls", "2", "--arch", "mistral"]) == 0
    results = json.loads((tmp_path / "compiled_host_mistral_cpu.json").read_text())["results"]
    assert len(results) == 4 and all(r["host_us"] > 0 for r in results)


def test_help_documents_every_subcommand():
    proc = subprocess.run([sys.executable, "-m", "qsparse_hf.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for command in ("convert", "report", "eval", "bench", "scaling"):
        assert command in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "qsparse_hf.cli", "report", "--help"], capture_output=True,
                          text=True)
    assert "--dense-baseline" in proc.stdout and "exit codes" in proc.stdout


def test_console_script_errors_cleanly_on_a_missing_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qsparse_hf.cli", "convert", str(tmp_path / "nope"), "--output",
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "not found" in proc.stderr and "Traceback" not in proc.stderr


def _bad_inputs(tmp) -> list[tuple[str, list[str], int]]:
    empty, binary, tiny_text, not_json, a_file = (tmp / n for n in ("empty.txt", "bin.txt", "tiny.txt", "x.json", "f"))
    empty.write_text("")
    binary.write_bytes(b"\x00\x01\x02binary")
    tiny_text.write_text("a short text " * 20)
    not_json.write_text("this is not json\n")
    a_file.write_text("a file, not a folder")
    checkpoint = tmp / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    model, text = str(EMBEDDED_MODEL), str(TEXT)
    convert = ["convert", model, "--output", str(tmp / "out")]
    report = ["report", model, "--topk", "0.5"]
    ppl = ["eval", model, "--perplexity", text]
    return [
        ("topk 0", [*convert, "--topk", "0"], 2),
        ("topk 1.5", [*convert, "--topk", "1.5"], 2),
        ("topk nan", [*convert, "--topk", "nan"], 2),
        ("topk int 1", [*convert, "--topk", "1"], 2),
        ("ffn-topk 0", [*convert, "--ffn-topk", "0"], 2),
        ("output under a file", ["convert", model, "--output", str(a_file / "sub")], 2),
        ("output is a file", ["convert", model, "--output", str(a_file)], 2),
        ("output holds a checkpoint", ["convert", model, "--output", str(checkpoint)], 2),
        ("empty text file", [*report, "--text-file", str(empty)], 2),
        ("binary text file", [*report, "--text-file", str(binary)], 2),
        ("missing text file", [*report, "--text-file", str(tmp / "nope.txt")], 2),
        ("samples beyond the text", [*report, "--text-file", str(tiny_text), "--samples", "100000"], 2),
        ("samples 0", [*report, "--text-file", text, "--samples", "0"], 2),
        ("max-tokens 0", [*report, "--text-file", text, "--max-tokens", "0"], 2),
        ("empty dataset", [*report, "--dataset", str(empty)], 2),
        ("non-JSON dataset", [*report, "--dataset", str(not_json)], 2),
        ("json under a file", [*report, "--text-file", text, "--json", str(a_file / "r.json")], 2),
        ("plot under a file", [*report, "--text-file", text, "--plot", str(a_file / "h.png")], 2),
        ("empty perplexity file", ["eval", model, "--perplexity", str(empty)], 2),
        ("binary perplexity file", ["eval", model, "--perplexity", str(binary)], 2),
        ("max-blocks 0", [*ppl, "--max-blocks", "0"], 2),
        ("block-size 1", [*ppl, "--block-size", "1"], 2),
        ("batch-size 0", [*ppl, "--batch-size", "0"], 2),
        ("bad device", [*ppl, "--device", "gpu0"], 2),
        ("compare missing", [*ppl, "--compare", str(tmp / "nonexistent")], 2),
        ("nothing to evaluate", ["eval", model], 2),
        ("budget 0", ["scaling", "--budget", "0"], 2),
        ("budget -1", ["scaling", "--budget", "-1"], 2),
        ("budget nan", ["scaling", "--budget", "nan"], 2),
        ("budget inf", ["scaling", "--budget", "inf"], 2),
    ] + ([] if torch_cuda_available() else [("cuda without a GPU", [*ppl, "--device", "cuda"], 3)])


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def test_every_bad_flag_exits_with_its_code_before_any_model_loads(tmp_path, monkeypatch, capsys):
    import qsparse_hf.cli as cli

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(cli, "_load", no_loading)
    failures = []
    for name, argv, code in _bad_inputs(tmp_path):
        got = main(argv)
        err = capsys.readouterr().err
        if got != code or "error" not in err:
            failures.append(f"{name}: exit {got} (want {code}); stderr {err.strip()[-200:]!r}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "out").exists()


def test_topk_flag_takes_a_count_as_the_api_does():
    from qsparse_hf.cli import build_parser

    assert build_parser().parse_args(["convert", "m", "--output", "o", "--topk", "64"]).topk == 64
    assert build_parser().parse_args(["convert", "m", "--output", "o", "--topk", "0.5"]).topk == 0.5


def test_convert_overwrite_replaces_a_checkpoint_all_or_nothing(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sparse"
    assert main(["convert", str(EMBEDDED_MODEL), "--topk", "0.5", "--output", str(out), "--dtype", "float32"]) == 0
    assert main(["convert", str(EMBEDDED_MODEL), "--topk", "0.7", "--output", str(out), "--dtype", "float32"]) == 2
    assert main(["convert", str(EMBEDDED_MODEL), "--topk", "0.7", "--output", str(out), "--dtype", "float32",
                 "--overwrite"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.quantization_config.topk == 0.7
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
