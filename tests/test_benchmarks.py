"""The benchmark scripts' input checks (they run on a GPU; on CPU they must refuse cleanly, before loading models)."""

import importlib
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
