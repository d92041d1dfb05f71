"""The benchmark scripts' input checks (they run on a GPU; on CPU they must refuse cleanly, before loading models)."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("script", ["bench_topk", "bench_gemv", "bench_decode", "bench_train_step",
                                    "bench_eager_host"])
def test_benchmark_without_gpu_exits_2(script, capsys):
    assert importlib.import_module(script).main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--keep", "1.5"], ["--keep", "0"], ["--layers", "0"], ["--repeats", "0"]])
def test_eager_host_refuses_bad_arguments_before_loading(argv, capsys):
    bench = importlib.import_module("bench_eager_host")
    assert bench.main(argv) == 2
    assert "--keep a fraction in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("dims", ["x", "", "4096,1"])
def test_topk_bench_refuses_bad_widths_before_touching_a_gpu(dims, capsys):
    bench = importlib.import_module("bench_topk")
    assert bench.main(["--one-row", "--dims", dims]) == 2
    assert "--dims takes comma-separated widths" in capsys.readouterr().err


def test_decode_bench_counts_graph_recordings_inside_its_block_only(monkeypatch):
    # --profile-host warms generate(static) up until a call records no CUDA graph; the count must see every
    # recording in the block and leave CUDAGraph as it was.
    bench = importlib.import_module("bench_decode")
    ended = []
    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_end", lambda self: ended.append(self))
    fake_end = torch.cuda.CUDAGraph.capture_end
    with bench.counting_graph_recordings() as recorded:
        torch.cuda.CUDAGraph.capture_end("first graph")
        torch.cuda.CUDAGraph.capture_end("second graph")
    assert recorded == [2] and ended == ["first graph", "second graph"]
    assert torch.cuda.CUDAGraph.capture_end is fake_end
    torch.cuda.CUDAGraph.capture_end("after")
    assert recorded == [2]


class _RecordingModel:
    """Stands in for a model whose first ``recording_calls`` generate() calls record a CUDA graph."""

    def __init__(self, recording_calls: int) -> None:
        self.calls, self.recording_calls = 0, recording_calls

    def generate(self, prompt, **kwargs):
        self.calls += 1
        if self.calls <= self.recording_calls:
            torch.cuda.CUDAGraph.capture_end(self)


@pytest.mark.parametrize("recording_calls, asked, made", [(3, 2, 4), (0, 1, 1), (0, 2, 2), (20, 2, 8)])
def test_decode_bench_warms_generate_up_until_a_call_records_no_graph(monkeypatch, recording_calls, asked, made):
    bench = importlib.import_module("bench_decode")
    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_end", lambda self: None)
    model = _RecordingModel(recording_calls)
    assert bench.warm_up_generate(model, None, {}, asked) == made == model.calls


def test_decode_bench_stops_generate_at_a_length_and_differences_kernel_profiles():
    # generate(static)'s per-token kernels come from two calls that stop at different lengths (same cache): the
    # criterion must stop exactly there, and the difference must cancel what both calls ran (the prefill).
    bench = importlib.import_module("bench_decode")
    stop = bench.StopAfter(5)
    assert not stop(torch.zeros(2, 4, dtype=torch.long), None).any()
    assert stop(torch.zeros(2, 5, dtype=torch.long), None).all()
    short = {"prefill_gemm": [3, 30.0], "gemv": [8, 16.0]}
    long = {"prefill_gemm": [3, 30.5], "gemv": [40, 80.0], "sdpa_mask": [32, 32.0]}
    assert bench.per_token_difference(short, long) == {"prefill_gemm": [0, 0.5], "gemv": [32, 64.0],
                                                       "sdpa_mask": [32, 32.0]}
    lines = bench._kernel_report(bench.per_token_difference(short, long), 32, 2, "m: generate(static)", top=2)
    assert lines[0].startswith("m: generate(static), 1.0 kernels and 1.5 µs of kernel time per layer (3 µs per step)")
    assert "gemv" in lines[1] and "sdpa_mask" in lines[2] and len(lines) == 3
    for short, long in ((8, 8), (0, 8), (8, 65)):  # no decode steps between the calls, or past the cache
        with pytest.raises(ValueError, match="0 < short < long <= new_tokens"):
            bench.generate_kernel_profile(None, torch.zeros(1, 4), "m", new_tokens=64, short=short, long=long)


def _triton_tools_present() -> bool:
    try:
        import triton
    except ImportError:
        return False
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return (tools / "ptxas").exists() and (tools / "cuobjdump").exists()


@pytest.mark.skipif(not _triton_tools_present(), reason="needs Triton's bundled ptxas and cuobjdump")
def test_default_topk_launches_keep_their_rows_in_registers_on_hopper(tmp_path):
    # Compiled for sm_90 on any machine (in a process of its own: on CPU this one runs Triton's interpreter). A
    # default one-token launch that spilled would read its keys back from local memory at every step of the
    # search, as the register kernel's 32768-key rows do (kernel_registers.py); rows that wide are streamed by
    # default, except where SiLU is fused (the streamed kernel has none).
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_registers.py"
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["OUT"] = str(tmp_path)
    subprocess.run([sys.executable, str(script), "--dims", "4096,14336,18944", "--defaults-only"], env=env,
                   check=True, capture_output=True)
    results = json.loads((tmp_path / "kernel_registers.json").read_text())["results"]
    assert len(results) == 6  # three widths, with and without the fused SiLU
    in_registers = [row for row in results if row["block"] <= 16384 or row["variant"] == "top-K"]
    assert len(in_registers) == 5
    assert all(row["spilled_bytes"] == 0 and row["num_warps"] >= 4 for row in in_registers), results
    assert [row["search"] for row in results if row["dim"] == 18944 and row["variant"] == "top-K"] == ["streamed 4096"]


def test_kernel_registers_refuses_bad_arguments(capsys):
    bench = importlib.import_module("kernel_registers")
    assert bench.main(["--dims", "0"]) == 2
    assert bench.main(["--keep", "2"]) == 2
    err = capsys.readouterr().err
    assert "--dims takes" in err and "--keep takes" in err
