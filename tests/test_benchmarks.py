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
                                    "bench_eager_host", "bench_compiled_host", "bench_attention"])
def test_benchmark_without_gpu_exits_2(script, capsys):
    assert importlib.import_module(script).main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("settings,message", [
    ("shipped,store_lost", "'store_lost'"), ("min_blocks", "'min_blocks'"), ("min_blocks=0", "'min_blocks=0'"),
    ("store_last=1", "'store_last=1'"), ("warps=2.5", "'warps=2.5'"), (",", "names no setting")])
def test_attention_bench_refuses_unknown_settings_before_loading(settings, message, capsys):
    bench = importlib.import_module("bench_attention")
    assert bench.main(["--settings", settings]) == 2
    assert message in capsys.readouterr().err


def test_attention_bench_settings_set_their_switches_and_restore_the_shipped_ones():
    from qsparse_hf import kernels
    from qsparse_hf.kernels import attention

    bench = importlib.import_module("bench_attention")
    settings = bench.parse_settings("shipped,min_blocks=8+store_last+prefetch,select_one_launch")
    assert settings == [{}, {"min_blocks": 8, "store_last": True, "prefetch": True}, {"select_one_launch": True}]
    shipped = bench.current_switches()
    try:
        bench.apply(settings[1], shipped)
        assert (attention._MIN_BLOCKS_PER_SPLIT, attention._STORE_LAST, kernels.ATTENTION_PREFETCH) == (8, True, True)
        assert attention._SKIP_HIDDEN == shipped["skip_hidden"]
        bench.apply(settings[2], shipped)  # what the last setting left on goes back to shipped
        assert kernels.SPLIT_SELECT_ONE_LAUNCH and attention._MIN_BLOCKS_PER_SPLIT == shipped["min_blocks"]
    finally:
        bench.apply({}, shipped)
    assert bench.current_switches() == shipped


@pytest.mark.parametrize("argv", [["--keep", "1.5"], ["--keep", "0"], ["--layers", "0"], ["--repeats", "0"]])
def test_eager_host_refuses_bad_arguments_before_loading(argv, capsys):
    bench = importlib.import_module("bench_eager_host")
    assert bench.main(argv) == 2
    assert "--keep a fraction in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--prefill", "--keep", "1.5"], ["--prefill", "--keep", "0"],
                                  ["--prefill", "--tokens", "8"], ["--prefill", "--tokens", "0"]])
def test_gemv_prefill_refuses_bad_arguments_before_touching_a_gpu(argv, capsys):
    bench = importlib.import_module("bench_gemv")
    assert bench.main(argv) == 2
    assert "--prefill takes --keep in (0, 1] and --tokens above 8" in capsys.readouterr().err


@pytest.mark.parametrize("keep", ["1", "0", "1.5"])
def test_gemv_tuner_check_refuses_a_keep_without_listed_rows(keep, capsys):
    bench = importlib.import_module("bench_gemv")
    assert bench.main(["--tuner", "--keep", keep]) == 2
    assert "--tuner takes --keep in (0, 1)" in capsys.readouterr().err


def test_gemv_tuner_check_reports_the_picks_of_each_timing(monkeypatch, tmp_path, capsys):
    # Each candidate is run once for real (here through Triton's interpreter) and timed two ways: the tuner's pick is
    # the fastest by the tuner's timing among all candidates, or among those without the tall tiles, and the graph's
    # fastest is reported beside them.
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernels on a CPU, through Triton's interpreter")
    import triton
    from transformers import Qwen2Config

    from qsparse_hf.kernels import gemv

    bench = importlib.import_module("bench_gemv")
    a, b, c = gemv.GemvConfig(32, 16, 2), gemv.GemvConfig(32, 32, 1), gemv.GemvConfig(64, 64, 1)
    monkeypatch.setattr(gemv, "_candidates", lambda n_out, n_in, tokens=1, tall=True: [a, b, c] if tall else [a, b])
    bench_us = {a: 3.0, b: 2.0, c: 1.0}  # as the tuner times them
    graph_us = {a: 1.5, b: 2.5, c: 2.0}  # in a graph
    current = {}
    real_sparse_gemv = gemv.sparse_gemv

    def sparse_gemv(x, weight_t, config=None, kept=None):
        current["config"] = config
        return real_sparse_gemv(x, weight_t, config=config, kept=kept)

    monkeypatch.setattr(gemv, "sparse_gemv", sparse_gemv)
    monkeypatch.setattr(triton.testing, "do_bench", lambda run, **_: (run(), bench_us[current["config"]] / 1000)[1])
    monkeypatch.setattr(bench, "graph_time_us", lambda step: (step(1), graph_us[current["config"]])[1])
    monkeypatch.setattr(bench, "L2_ESCAPE_BYTES", 0)
    monkeypatch.setitem(bench.CONFIGS, "qwen2", lambda layers: Qwen2Config(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=layers))
    monkeypatch.setenv("OUT", str(tmp_path))
    args = bench.argparse.Namespace(arch="qwen2", keep=0.5, dtype="bfloat16")
    assert bench.tuner(args, device="cpu") == 0
    results = json.loads((tmp_path / "gemv_tuner_qwen2_keep0.5.json").read_text())["results"]
    assert [r["group"] for r in results] == ["q/k/v", "o", "gate/up", "down"]
    assert [(r["n_in"], r["n_out"], r["k"]) for r in results[:1]] == [(64, 64 + 2 * 32, 32)]
    for r in results:
        assert r["tuner"] == [list(c), 1.0, 2.0] and r["tuner without tall tiles"] == [list(b), 2.0, 2.5]
        assert r["fastest_in_graph"] == [list(a), 3.0, 1.5] and len(r["launches"]) == 3
    assert "| q/k/v | 3 | 64/64/1/4: 2.0 | 32/32/1/4: 2.5 | 32/16/2/4: 1.5 |" in capsys.readouterr().out


def test_decode_bench_variants_switch_settings_the_kernels_have():
    # Each compiled variant flips module settings for its step; a misspelt one would time the shipped step under
    # another name.
    from qsparse_hf import kernels

    bench = importlib.import_module("bench_decode")
    assert set(bench.COMPILED_VARIANTS) <= set(bench.STEP_WAYS)
    for switches in bench.COMPILED_VARIANTS.values():
        for name, value in switches.items():
            assert hasattr(kernels, name) and getattr(kernels, name) != value


@pytest.mark.parametrize("argv", [["--keep", "1.5"], ["--layers", "0"], ["--calls", "0"]])
def test_compiled_host_refuses_bad_arguments_before_loading(argv, capsys):
    bench = importlib.import_module("bench_compiled_host")
    assert bench.main(argv) == 2
    assert "--keep in (0, 1]" in capsys.readouterr().err


def test_compiled_host_times_a_compiled_call_that_decodes_like_eager():
    # The call it times is a real decode step: compiled (also with every guard dropped) it gives the eager logits.
    from conftest import tiny_model

    bench = importlib.import_module("bench_compiled_host")
    model = tiny_model("qwen2")
    prompt = torch.randint(3, 128, (1, 6))
    with torch.no_grad():
        eager_cache = bench.StaticCache(config=model.config, max_cache_len=8)
        model(prompt, past_key_values=eager_cache, cache_position=torch.arange(6))
        eager = model(prompt[:, -1:], past_key_values=eager_cache, cache_position=torch.tensor([6])).logits
        for guard_filter in (None, bench.drop_all_guards):
            call = bench.compiled_decode_call(model, prompt, backend="eager", guard_filter=guard_filter,
                                              max_cache_len=16)
            torch.testing.assert_close(call(), eager)
            assert bench.host_us_per_call(call, calls=3, warmup=1) > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mode's run is checked on CPU machines")
def test_compiled_host_on_a_cpu_times_the_host_work_of_each_model(monkeypatch, tmp_path, capsys):
    # --cpu: a small model through Triton's interpreter, outputs replayed; it needs the interpreter switched on.
    from qsparse_hf.kernels import set_kernels_enabled

    bench = importlib.import_module("bench_compiled_host")
    monkeypatch.delenv("QSPARSE_KERNELS", raising=False)
    assert bench.main(["--cpu"]) == 2
    assert "QSPARSE_KERNELS=interpret" in capsys.readouterr().err
    monkeypatch.setenv("QSPARSE_KERNELS", "interpret")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("OUT", str(tmp_path))
    previous = set_kernels_enabled(True, on_cpu=True)
    try:
        assert bench.main(["--cpu", "--layers", "1", "--calls", "3"]) == 0
    finally:
        set_kernels_enabled(previous, on_cpu=False)
    results = json.loads((tmp_path / "compiled_host_qwen2_cpu.json").read_text())["results"]
    assert [r["model"] for r in results] == ["dense", "qsparse keep 0.5", "qsparse keep 0.5, no guards", "dense again"]
    assert all(r["host_us"] > 0 and r["gpu_ms"] is None for r in results)
    assert "CPU, small model, outputs replayed" in capsys.readouterr().out


@pytest.mark.parametrize("dims", ["x", "", "4096,1"])
def test_topk_bench_refuses_bad_widths_before_touching_a_gpu(dims, capsys):
    bench = importlib.import_module("bench_topk")
    assert bench.main(["--one-row", "--dims", dims]) == 2
    assert "--dims takes comma-separated widths" in capsys.readouterr().err


def test_decode_bench_timeline_adds_up_to_the_step_and_finds_one_layer():
    # --timeline: a kernel that starts early and waits (PDL) exposes only what it runs past the others; idle gaps
    # count for the kernel after them; one layer is the run that repeats mid-step, whatever the first and last do.
    bench = importlib.import_module("bench_decode")
    kernels = [("embed", 0.0, 2.0), ("gemv", 3.0, 20.0), ("select", 5.0, 24.0), ("gemv", 21.0, 30.0),
               ("tail", 26.0, 29.0)]
    timed = bench.exposed_times(kernels)
    assert [k["exposed"] for k in timed] == [2.0, 18.0, 4.0, 6.0, 0.0]
    assert sum(k["exposed"] for k in timed) == 30.0 and timed[2]["duration"] == 19.0 and timed[4]["offset"] == 26.0
    assert bench.exposed_times([]) == []
    layer = ["norm", "gemv", "attn", "select", "gemv", "norm", "gemv", "count", "write", "gemv"]
    step = ["embed", "rotary"] + layer + ["mask"] + layer * 26 + layer[:4] + ["final"] + layer[4:] + ["head"]
    start, length = bench.repeating_run(step)
    assert length == len(layer) and step[start:start + length] == step[start + length:start + 2 * length]
    assert sorted(step[start:start + length]) == sorted(layer)
    few = ["embed", "rotary"] + layer + ["mask"] + layer + layer[:3] + ["final"] + layer[3:] + ["head"]
    assert bench.repeating_run(few) is None


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


def test_decode_bench_stops_generate_at_a_length_and_differences_kernel_profiles(monkeypatch):
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
    # With programmatic dependent launch a kernel's time includes its wait: the report says so under its heading.
    monkeypatch.setattr(bench, "pdl_enabled", lambda: True)
    noted = bench._kernel_report(bench.per_token_difference(short, long), 32, 2, "m: generate(static)", top=2)
    assert "QSPARSE_PDL=0" in noted[1] and noted[:1] + noted[2:] == lines
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
    # three widths, with and without the fused SiLU; the two wide ones also split (two kernels) when hinted, with
    # and without SiLU and the product
    assert len(results) == 14
    assert sum(row["variant"].startswith("split") for row in results) == 8
    whole_rows = [row for row in results if not row["variant"].startswith("split")]
    in_registers = [row for row in whole_rows if row["block"] <= 16384 or row["variant"] == "top-K"]
    assert len(in_registers) == 5
    assert all(row["num_warps"] >= 4 for row in in_registers), results
    # Compiled as Triton's JIT compiles a launch (16-byte aligned pointers, 16-divisible widths and strides): the
    # streamed launch and the 4096-key ones (a hinted token's: 16 warps, 8 keys a thread) spill nothing; 16 warps
    # cap a thread at 128 registers, and the 16384-key launches (prefill rows of 14336) spill a few words (32 bytes,
    # 88 with SiLU), not their 32 keys a thread.
    assert all(row["spilled_bytes"] == 0 for row in in_registers if row["block"] != 16384), results
    assert all(row["num_warps"] == 16 for row in in_registers if row["block"] == 4096), results
    assert all(row["spilled_bytes"] <= 96 for row in in_registers), results
    # A split launch holds a part of the row and (its last program) every part's histogram: a few words of stack
    # at most (8 bytes at 14336 features), never the histograms (64 x 128 counts at 18944 would be 32 KB).
    split = [row for row in results if row["variant"].startswith("split")]
    assert all(row["spilled_bytes"] <= 64 for row in split), split
    assert [row["search"] for row in results if row["dim"] == 18944 and row["variant"] == "top-K"] == ["streamed 4096"]


@pytest.mark.skipif(not _triton_tools_present(), reason="needs Triton's bundled ptxas and cuobjdump")
def test_two_and_three_launch_ffn_kernels_compile_for_hopper_without_spilling(tmp_path):
    # The gated FFN's decode kernels (kernels.ffn) compiled for sm_90 at their default launches for both 7B shapes:
    # the interpreter runs code the GPU compiler may refuse (a value changing type inside a branch), and a launch
    # that spilled would stream its tile through local memory.
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_registers.py"
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["OUT"] = str(tmp_path)
    subprocess.run([sys.executable, str(script), "--ffn", "--defaults-only"], env=env, check=True,
                   capture_output=True)
    results = json.loads((tmp_path / "kernel_registers_ffn.json").read_text())["results"]
    assert sorted((row["arch"], row["form"], row["kernel"]) for row in results) == sorted(
        (arch, form, kernel) for arch in ("mistral", "qwen2") for form, kernel in (
            ("masked", "gate/up GEMV, top-K resolved"), ("listed", "gate/up GEMV, top-K resolved"),
            ("listed", "listed: writing launch"), ("masked", "down GEMV, masked")))
    assert all(row["spilled_bytes"] == 0 for row in results), results


_PREFETCH_RESOURCES = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import kernel_registers as registers
from qsparse_hf.kernels import gemv
gemv.pdl_enabled = lambda: True
gemv.pdl_constants = lambda: dict(PDL=True, launch_pdl=True)
pointers = {**registers._FFN_POINTER_TYPES, "key_ptr": "*bf16", "x_ptr": "*bf16", "out_ptr": "*bf16", "zeros_ptr": "*i64"}
found = []
for n_in, n_out, config, silu in ((3584, 37888, (64, 64, 1, 4, 3), False), (3584, 3584, (64, 128, 14, 4, 3), False),
                                  (18944, 3584, (64, 64, 8, 4, 3), True)):
    launches = [gemv._Launch(1, n_in, n_out, n_in // 2, gemv.GemvConfig(*config), False, False, True,
                             prefetch=prefetch, prefetch_silu=silu and prefetch is not None)
                for prefetch in (None, torch.bfloat16)]
    constants = launches[1].launch.constants
    found.append([constants.get("PREFETCH_WINDOW"), constants.get("PREFETCH_LINES"),
                  *[registers.sm90_resources(launch.launch, pointers) for launch in launches]])
print(json.dumps(found))
"""


def _sm90_resources_in_a_process(script: str):
    """What ``script`` (given the benchmarks folder) prints as JSON on its last line, run in a process of its own
    without Triton's interpreter (it compiles kernels for sm_90 as the JIT would)."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    done = subprocess.run([sys.executable, "-c", script, str(benchmarks)], env=env, check=True, capture_output=True,
                          text=True)
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(not _triton_tools_present(), reason="needs Triton's bundled ptxas and cuobjdump")
def test_gemv_prefetch_guess_compiles_for_hopper_without_spills():
    # The L2 prefetch (`kernels.GEMV_PREFETCH`) runs only compiled with programmatic dependent launch, never in the
    # interpreter: compiled for sm_90 as the JIT would (in a process of its own), for Qwen2-7B's gate/up at keep 0.5
    # (one split of every listed row: its first 256 rows guessed from a 512-feature window, a 128-byte line each),
    # o_proj's tall tiles (14 splits of 128 rows: a 256-feature window each) and down (8 splits, guessed from the
    # SiLU of the gate: a 512-feature window each), beside the same launches without it.
    (gate_up, o_proj, down) = _sm90_resources_in_a_process(_PREFETCH_RESOURCES)
    for found, window in ((gate_up, 512), (o_proj, 256), (down, 512)):
        (plain_registers, plain_spill), (registers, spill) = found[2], found[3]
        assert found[:2] == [window, 1]
        assert spill == plain_spill == 0 and registers <= plain_registers + 8


_NORM_RESOURCES = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import kernel_registers as registers
from qsparse_hf.kernels import topk
topk.pdl_constants = lambda: dict(PDL=True, launch_pdl=True)
pointers = {**registers._POINTER_TYPES, "delta_ptr": "*bf16", "residual_ptr": "*bf16", "weight_ptr": "*bf16",
            "sum_ptr": "*bf16", "normed_ptr": "*bf16", "eps": "fp32"}
found = []
for dim in (3584, 4096):
    row = torch.zeros(1, dim, dtype=torch.bfloat16)
    key = (dim, torch.bfloat16, True, True)
    try:  # (the launch object is made, then refused: CPU tensors never reach a compiled kernel)
        topk.norm_topk_rows(row, torch.ones(dim, dtype=torch.bfloat16), 1e-6, dim // 2, residual=row,
                            hint=topk.new_hint("cpu", 1))
    except Exception:
        pass
    plain = topk._row_launch(dim, dim // 2, torch.bfloat16, True, False, None, True).launch
    found.append([registers.sm90_resources(topk._NORM_LAUNCHES[key], pointers),
                  registers.sm90_resources(plain, pointers)])
print(json.dumps(found))
"""


@pytest.mark.skipif(not _triton_tools_present(), reason="needs Triton's bundled ptxas and cuobjdump")
def test_folded_norm_selection_compiles_for_hopper_without_spills():
    # The residual add and RMSNorm before a one-token selection (`topk.norm_topk_rows`) at the 7B hidden widths,
    # hinted, with programmatic dependent launch, compiled for sm_90 as the JIT would: no spills, and at most a few
    # registers more than the plain hinted selection beside it.
    for (registers, spill), (plain_registers, plain_spill) in _sm90_resources_in_a_process(_NORM_RESOURCES):
        assert spill == plain_spill == 0 and registers <= plain_registers + 16


_ATTENTION_RESOURCES = """
import json, sys
sys.path.insert(0, sys.argv[1])
import kernel_registers as registers
from qsparse_hf.kernels import attention
from qsparse_hf.kernels.launch import KernelLaunch
pointers = {name: "*bf16" for name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "new_k_ptr", "new_v_ptr", "cos_ptr",
                                       "sin_ptr")}
pointers.update(mask_ptr="*i1", part_ptr="*fp32", sem_ptr="*i32", count_ptr="*i64", scale="fp32")
found = []
for prefetch in (False, True):
    launch = KernelLaunch(attention._decode_attention_kernel, dict(
        GROUP=7, GROUP_PAD=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_S=64, BLOCKS_PER_SPLIT=2, MAX_SPLITS=16,
        HAS_MASK=True, APPEND=True, PRECISE=True, num_warps=4, PDL=True, launch_pdl=True, PREFETCH=prefetch))
    compiled = registers.sm90_compile(launch, pointers)
    found.append([*registers.sm90_resources(launch, pointers), compiled.asm["ptx"].count("prefetch.global.L2")])
print(json.dumps(found))
"""


@pytest.mark.skipif(not _triton_tools_present(), reason="needs Triton's bundled ptxas and cuobjdump")
def test_attention_prefetch_compiles_for_hopper_without_spills():
    # The decode attention's L2 prefetch (`kernels.ATTENTION_PREFETCH`) runs only compiled with programmatic
    # dependent launch, never in the interpreter: compiled for sm_90 as the JIT would, Qwen2-7B's heads (a group of
    # 7, 128 wide, two blocks of 64 positions a split), it issues prefetches only when asked, and spills nothing.
    (plain_registers, plain_spill, plain_prefetches), (registers, spill, prefetches) = (
        _sm90_resources_in_a_process(_ATTENTION_RESOURCES))
    assert plain_prefetches == 0 < prefetches
    assert spill == plain_spill == 0 and registers <= plain_registers + 16


def test_kernel_registers_refuses_bad_arguments(capsys):
    bench = importlib.import_module("kernel_registers")
    assert bench.main(["--dims", "0"]) == 2
    assert bench.main(["--keep", "2"]) == 2
    err = capsys.readouterr().err
    assert "--dims takes" in err and "--keep takes" in err


class _TimedModel:
    """Stands in for a model whose generate() takes ``prefill + per_token * (max_new_tokens - 1)`` seconds of a
    fake clock (``clock[0]``), and whose ``recording_calls`` first calls record a CUDA graph."""

    def __init__(self, name: str, clock: list, calls: list, prefill: float, per_token: float,
                 recording_calls: int = 0) -> None:
        self.name, self.clock, self.calls = name, clock, calls
        self.prefill, self.per_token, self.recording_calls, self.made = prefill, per_token, recording_calls, 0

    def generate(self, prompt, max_new_tokens, **kwargs):
        assert kwargs["cache_implementation"] == "static" and kwargs["min_new_tokens"] == max_new_tokens
        self.made += 1
        if self.made <= self.recording_calls:
            torch.cuda.CUDAGraph.capture_end(self)
        self.calls.append((self.name, max_new_tokens))
        self.clock[0] += self.prefill + self.per_token * (max_new_tokens - 1)


def test_decode_bench_times_generate_static_side_by_side_and_splits_the_prefill(monkeypatch):
    # Each round calls every model in turn (whole call, then the prefill-only call); the decode time per token is
    # the difference of the best of each over the decode steps, the whole-call figure is per new token.
    bench = importlib.import_module("bench_decode")
    clock, calls = [0.0], []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_end", lambda self: None)
    dense = _TimedModel("dense", clock, calls, prefill=0.030, per_token=0.006, recording_calls=3)
    sparse = _TimedModel("sparse", clock, calls, prefill=0.040, per_token=0.005)
    timings = bench.generate_static_side_by_side({"dense": dense, "sparse": sparse}, None, new_tokens=11, rounds=2)
    timed = calls[-8:]
    assert timed == [("dense", 11), ("dense", 1), ("sparse", 11), ("sparse", 1)] * 2
    assert timings["dense"]["static_decode"] == pytest.approx(6.0)
    assert timings["sparse"]["static_decode"] == pytest.approx(5.0)
    assert timings["sparse"]["static_prefill"] == pytest.approx(40.0)
    assert timings["sparse"]["static"] == pytest.approx((40 + 50) / 11)
    # dense recorded in its first three warm-up calls (one more than asked for), none in the timed ones
    assert dense.made == 4 + 1 + 4 and timings["dense"]["static_recordings"] == 0
    with pytest.raises(ValueError, match="new_tokens >= 2 and rounds >= 1"):
        bench.generate_static_side_by_side({"dense": dense}, None, new_tokens=1)


def test_decode_bench_static_pairs_each_keep_with_the_dense_model_it_leaves_dense(monkeypatch):
    # Each keep setting runs as a converted copy beside the untouched dense model; its ratio is against the dense
    # calls of its own rounds, and the dense entry keeps its best.
    from transformers import AutoModelForCausalLM, MistralConfig

    from qsparse_hf import QSparseLinear

    bench = importlib.import_module("bench_decode")
    config = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=64)
    model = AutoModelForCausalLM.from_config(config).eval()
    seen = []

    def side_by_side(models, prompt, new_tokens, rounds):
        (dense_label, dense), (label, sparse) = models.items()
        assert dense_label == "dense" and dense is model and sparse is not model and (new_tokens, rounds) == (16, 2)
        assert isinstance(sparse.model.layers[0].mlp.down_proj, QSparseLinear)
        assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
        seen.append(label)
        dense_ms = 6.0 if len(seen) == 1 else 5.0
        return {"dense": {"static": dense_ms, "static_decode": dense_ms - 0.1, "static_prefill": 30.0,
                          "static_recordings": 1},
                label: {"static": 4.0, "static_decode": 3.9, "static_prefill": 40.0, "static_recordings": 0}}

    monkeypatch.setattr(bench, "generate_static_side_by_side", side_by_side)
    results = [{"model": "dense"}, {"model": "qsparse keep 0.7"}, {"model": "qsparse keep 0.5"}]
    bench.measure_static_side_by_side(model, None, [0.7, 0.5], results, 16, 2)
    assert seen == ["qsparse keep 0.7", "qsparse keep 0.5"]
    assert results[0] == {"model": "dense", "static": 5.0, "static_decode": 4.9, "static_prefill": 30.0,
                          "static_recordings": 2}
    assert results[1]["static_vs_dense"] == pytest.approx(1.5) and results[2]["static_vs_dense"] == pytest.approx(1.25)
    assert results[2]["static_prefill"] == 40.0
