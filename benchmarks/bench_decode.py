"""End-to-end decode: a 7B-shaped model (random bf16 weights), batch 1, dense vs Q-Sparse, measured in one run.

Two ways of running the decode step (forward + greedy argmax, HF static cache), for dense and sparse alike:
- ``graph``: the eager forward captured once in a CUDA graph and replayed (no launch gaps);
- ``compile``: ``torch.compile(mode="reduce-overhead", fullgraph=True)`` (Inductor fuses norms, rotary, residuals
  and captures its own CUDA graphs).
The dense baseline is the faster of the two; every sparse number is divided by it (and by the dense number of its
own mode, shown beside it). ``--generate`` adds ``model.generate()`` exactly as users call it: eager with the
dynamic cache (``eager``), and ``cache_implementation="static"`` (``static``: transformers compiles the decode
forward), each against dense called the same way (``--ways`` picks; sparsity tracking stays on, as users have it).
Eager ``generate()`` is bound by the host's CPU: it is timed first, before any compilation, in ``--rounds`` rounds
over all models (dense and sparse alternated, two calls each), and each model keeps its best call.
``generate(static)`` is timed last, each keep setting as a converted copy beside the dense model, the two called in
turn for ``--rounds`` rounds (its ratio is against the dense calls of its own rounds); it also reports the prefill
call and the time per decode token apart (`generate_static_side_by_side`).
``eager2`` is eager ``generate()`` with the selection in a launch of its own (``QSPARSE_SELECT_IN_GEMV=0``), the
A/B for eager steps' single launch; ``compile2`` is the compiled step with the FFN activation's SiLU and product
left to the compiler around the top-K (``QSPARSE_FUSED_ACTIVATION=0``), the A/B for that fusion (on by default);
``compile3`` is the compiled step with each gated FFN in two launches (``QSPARSE_FUSED_FFN=masked``:
`kernels.ffn`), ``compile4`` in three (``listed``), the A/Bs for those (off by default); ``compile6`` is the compiled
step with transformers' SDPA attention instead of the one-launch decode attention (``QSPARSE_DECODE_ATTENTION=0``,
`qsparse_hf.attention`), ``compile7`` the compiled step with the one-launch attention but the model's own rotary and
cache append around it (``QSPARSE_DECODE_APPEND=0``), ``compile8`` the compiled step whose GEMVs do not prefetch
their likely rows into L2 while the selection before them runs (``QSPARSE_GEMV_PREFETCH=0``; on by default),
``compile9`` the compiled step whose down GEMV does not prefetch (``QSPARSE_GEMV_PREFETCH_DOWN=0``; on by default),
``compile10`` the compiled step with each residual add and RMSNorm left to the compiler, before the selection after
it (``QSPARSE_FUSED_NORM=0``, `layers.DecoderLayerForward`; folded into the selection's launch by default),
``compile12`` the compiled step whose decode attention asks L2 for its cached keys and values before its wait
(``QSPARSE_ATTENTION_PREFETCH=1``; off by default until timed), ``compile13`` the compiled step whose FFN activation's
split selection counts and writes in one launch (``QSPARSE_SPLIT_SELECT_ONE_LAUNCH=1``; off by default until timed).
For dense each is a second sample of the same call.
``--count-kernels`` counts the kernels one eager decode step launches, per decoder layer; ``--profile-host`` profiles
the host side of eager ``generate()`` (and of ``generate(static)`` with ``static`` in ``--ways``); ``--profile-kernels``
lists the kernels of the compiled step by time, per layer, and with ``static`` in ``--ways`` those of one decode
token of ``generate(static)`` beside them (with its wall time per token, prefill excluded), and those and the host's
operators of its prefill call. With programmatic dependent launch a kernel starts before the one it follows has
finished and waits inside it, and the profiler counts that wait as the kernel's duration (a 5 µs selection read
53 µs after the gate/up GEMV): for the time each kernel itself takes, profile with ``QSPARSE_PDL=0`` (and
``--inductor-pdl off``); the step's time is what PDL changes. ``--timeline`` shows where that time goes: one
layer's kernels of the compiled step in launch order, each with the time by which it ends later than every kernel
before it (`exposed_times`: waits excluded, idle gaps included; they add up to the step), and those times per
layer by kernel.
Programmatic dependent launch (Hopper and later GPUs) is on by default for our kernels (``QSPARSE_PDL=0`` turns it
off) and for Inductor's (``torch._inductor.config.triton.enable_pdl``; ``--inductor-pdl off`` leaves it off), for
dense and sparse alike: on an H100 it makes the compiled dense step faster (6.84 -> 6.54 ms a token for Qwen2-7B),
so the best dense baseline has it. The title and the JSON say which were on.

    python benchmarks/bench_decode.py --arch mistral --new-tokens 256 --ways graph,compile,eager,static --count-kernels
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import ms_per_call, print_table, write_json  # noqa: E402

from transformers import (AutoModelForCausalLM, MistralConfig, Qwen2Config, StaticCache,  # noqa: E402
                          StoppingCriteria, StoppingCriteriaList)

import qsparse_hf  # noqa: E402
from qsparse_hf import convert_to_qsparse, revert_qsparse  # noqa: E402
from qsparse_hf import kernels  # noqa: E402
from qsparse_hf.kernels import prepare_for_decode  # noqa: E402
from qsparse_hf.kernels.launch import pdl_enabled  # noqa: E402

#: Ways bound by host time, timed first (see main).
HOST_BOUND = ("eager", "eager2")
#: Ways that time the decode step itself (the dense baseline is the fastest of them).
STEP_WAYS = ("graph", "compile", "compile2", "compile3", "compile4", "compile6", "compile7", "compile8", "compile9",
             "compile10", "compile12", "compile13")
#: The compiled ways that are A/Bs: the `qsparse_hf.kernels` switches each sets for its run.
COMPILED_VARIANTS = {"compile2": {"FUSED_ACTIVATION": False}, "compile3": {"FUSED_FFN": "masked"},
                     "compile4": {"FUSED_FFN": "listed"}, "compile6": {"DECODE_ATTENTION": False},
                     "compile7": {"DECODE_APPEND": False}, "compile8": {"GEMV_PREFETCH": False},
                     "compile9": {"GEMV_PREFETCH_DOWN": False}, "compile10": {"FUSED_NORM": False},
                     "compile12": {"ATTENTION_PREFETCH": True},
                     "compile13": {"SPLIT_SELECT_ONE_LAUNCH": True}}

CONFIGS = {
    # sliding_window=None: with Mistral's default window Dynamo recompiles at every step (for dense and sparse).
    "mistral": lambda layers: MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                                            num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                            sliding_window=None),
    "qwen2": lambda layers: Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers,
                                        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
}
#: Decoder layers of each 7B model (`CONFIGS` takes any number).
LAYERS = {"mistral": 32, "qwen2": 28}


def set_inductor_pdl() -> bool:
    """Turn on programmatic dependent launch in Inductor's generated kernels where this torch has the option and
    every GPU is a Hopper or later one; returns whether it is on."""
    import torch._inductor.config as inductor_config

    if not hasattr(inductor_config.triton, "enable_pdl") or any(
            torch.cuda.get_device_capability(i)[0] < 9 for i in range(torch.cuda.device_count())):
        return False
    inductor_config.triton.enable_pdl = True
    return True


def greedy_step(model, prompt: torch.Tensor, max_cache_len: int, compiled: bool):
    """Prefill ``prompt`` eagerly into a fresh static cache; returns ``(step, position)``: ``step()`` runs one greedy
    decode step in place (forward, compiled with reduce-overhead when ``compiled``, argmax, position + 1).
    Call both under ``torch.no_grad()``."""
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    forward = (torch.compile(model.forward, mode="reduce-overhead", dynamic=False, fullgraph=True)
               if compiled else model.forward)
    logits = model(prompt, past_key_values=cache, use_cache=True,
                   cache_position=torch.arange(prompt.shape[1], device=prompt.device)).logits
    token = logits[:, -1:].argmax(-1)
    position = torch.tensor([prompt.shape[1]], device=prompt.device)

    def step():
        out = forward(token, past_key_values=cache, cache_position=position, use_cache=True).logits
        token.copy_(out[:, -1:].argmax(-1))
        position.add_(1)

    return step, position


def decode_ms_per_token(model, prompt: torch.Tensor, new_tokens: int, mode: str) -> float:
    """Prefill eagerly, then time ``new_tokens`` greedy steps: replayed from one captured CUDA graph (``graph``) or
    through ``torch.compile`` reduce-overhead (``compile``; ``compile2`` to ``compile13``: with the switches of
    `COMPILED_VARIANTS`, see the module's docstring)."""
    torch._dynamo.reset()
    if mode in COMPILED_VARIANTS:
        saved = {name: getattr(kernels, name) for name in COMPILED_VARIANTS[mode]}
        for name, value in COMPILED_VARIANTS[mode].items():
            setattr(kernels, name, value)
        prepare_for_decode(model)  # tunes, outside the CUDA graphs, what the switches add
        try:
            return decode_ms_per_token(model, prompt, new_tokens, "compile")
        finally:
            for name, value in saved.items():
                setattr(kernels, name, value)
    with torch.no_grad():
        step, position = greedy_step(model, prompt, prompt.shape[1] + new_tokens + 16, mode == "compile")
        if mode == "compile":
            for _ in range(6):  # Inductor's compile, its CUDA-graph warm-up and recording happen here
                step()
            replay = step
        else:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):  # warm-up: kernel compilation and tuning happen here
                    step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            replay = graph.replay
        position.fill_(prompt.shape[1] + 8)
        return ms_per_call(replay, new_tokens)


def generate_kwargs(new_tokens: int, static: bool) -> dict:
    """``model.generate`` arguments of every timed or profiled call: greedy, exactly ``new_tokens`` new tokens,
    and with ``static`` the static cache (whose decode forward transformers compiles)."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if static:
        kwargs["cache_implementation"] = "static"
    return kwargs


@contextlib.contextmanager
def counting_graph_recordings():
    """Count the CUDA graphs recorded inside the block (``CUDAGraph.capture_end`` calls, cudagraph trees' included):
    ``with counting_graph_recordings() as recorded: ...`` then ``recorded[0]``."""
    recorded = [0]
    original = torch.cuda.CUDAGraph.capture_end

    def capture_end(self, *args, **kwargs):
        recorded[0] += 1
        return original(self, *args, **kwargs)

    torch.cuda.CUDAGraph.capture_end = capture_end
    try:
        yield recorded
    finally:
        torch.cuda.CUDAGraph.capture_end = original


def warm_up_generate(model, prompt: torch.Tensor, kwargs: dict, calls: int, max_calls: int = 8) -> int:
    """Call ``model.generate(prompt, **kwargs)`` ``calls`` times, and more (``max_calls`` in all at most) until a
    call records no CUDA graph. A ``generate(static)`` call makes a new cache and cudagraph trees record again
    whenever its address matches no recording: the first few calls record, later ones settle (an H200 run of a
    4-layer Qwen2: one or two recordings in the first four calls, none after). Returns the calls made."""
    for made in range(1, max_calls + 1):
        with counting_graph_recordings() as recorded:
            model.generate(prompt, **kwargs)
        if made >= calls and not recorded[0]:
            break
    return made


def _timed_generate(model, prompt: torch.Tensor, kwargs: dict) -> float:
    """Seconds of one ``model.generate(prompt, **kwargs)``, the GPU drained before and after."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(prompt, **kwargs)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def generate_ms_per_token(model, prompt: torch.Tensor, new_tokens: int, repeats: int = 2, warmups: int = 1) -> float:
    """Wall time of eager ``model.generate`` (greedy, exactly ``new_tokens`` new tokens, dynamic cache) per new
    token, the best of ``repeats`` calls after ``warmups`` warm-up calls. It is bound by host time, which on a shared
    host varies by ~20 % from one call to the next: the best call is the stable figure. (``generate(static)``:
    `generate_static_side_by_side`.)"""
    kwargs = generate_kwargs(new_tokens, static=False)
    with torch.no_grad():
        for _ in range(warmups):
            model.generate(prompt, **kwargs)
        return min(_timed_generate(model, prompt, kwargs) for _ in range(repeats)) * 1000 / new_tokens


def generate_static_side_by_side(models: dict, prompt: torch.Tensor, new_tokens: int, rounds: int = 5) -> dict:
    """``generate(..., cache_implementation="static")`` of several models timed side by side: each warmed up
    (compiled, its graphs recorded: `warm_up_generate`), then ``rounds`` rounds that call every model in turn, once
    for ``new_tokens`` tokens and once for one (the prefill and its token); each model keeps its best of each.

    Returns ``{label: {"static": ms per new token of the whole call, as users see it, "static_decode": ms per
    decode token (the two calls' difference over ``new_tokens - 1``), "static_prefill": ms of the one-token call,
    "static_recordings": CUDA graphs recorded in the timed calls}}``. Timed one after the other, minutes apart, two
    models whose compiled decode is the same graph (a 28-layer Qwen2 at keep 0.5 with sparsity tracking on and off:
    tracking only counts in the eager prefill) measured 6.20 and 6.69 ms per decode token on an H200; side by side
    they share whatever drifts.

    Example:
        >>> generate_static_side_by_side({"dense": dense, "keep 0.5": sparse}, prompt, 128)  # doctest: +SKIP
        {'dense': {'static': 6.71, 'static_decode': 6.53, ...}, 'keep 0.5': {...}}
    """
    if new_tokens < 2 or rounds < 1:
        raise ValueError(f"generate_static_side_by_side needs new_tokens >= 2 and rounds >= 1, got new_tokens="
                         f"{new_tokens}, rounds={rounds}")
    whole, prefill = generate_kwargs(new_tokens, static=True), generate_kwargs(1, static=True)
    best = {label: {"static": float("inf"), "static_prefill": float("inf"), "static_recordings": 0} for label in models}
    with torch.no_grad():
        for model in models.values():
            warm_up_generate(model, prompt, whole, 2)
            warm_up_generate(model, prompt, prefill, 1)
        with counting_graph_recordings() as recorded:
            for _ in range(rounds):
                for label, model in models.items():
                    before = recorded[0]
                    seconds = {"static": _timed_generate(model, prompt, whole),
                               "static_prefill": _timed_generate(model, prompt, prefill)}
                    for key, value in seconds.items():
                        best[label][key] = min(best[label][key], value)
                    best[label]["static_recordings"] += recorded[0] - before
    for timing in best.values():
        timing["static_decode"] = (timing["static"] - timing["static_prefill"]) * 1000 / (new_tokens - 1)
        timing["static"] *= 1000 / new_tokens
        timing["static_prefill"] *= 1000
    return best


def measure_static_side_by_side(model, prompt: torch.Tensor, keeps: list[float], results: list[dict],
                                new_tokens: int, rounds: int) -> None:
    """``generate(static)`` of each keep setting side by side with the dense ``model`` (a converted copy beside
    it, one at a time: `generate_static_side_by_side`), printed and filled into ``results`` (dense first, then one
    entry per keep): ``static``, ``static_decode``, ``static_prefill``, ``static_recordings``, and for each keep
    ``static_vs_dense`` against the dense calls of its own rounds. The dense entry keeps its best rounds."""
    torch._dynamo.reset()
    dense = results[0]
    for keep, entry in list(zip(keeps, results[1:])) or [(None, dense)]:
        models = {"dense": model}
        if keep is not None:
            sparse = convert_to_qsparse(copy.deepcopy(model), topk=keep)
            prepare_for_decode(sparse)
            models[entry["model"]] = sparse
        timings = generate_static_side_by_side(models, prompt, new_tokens, rounds)
        beside = timings["dense"]
        for key, value in beside.items():
            dense[key] = dense.get(key, 0) + value if key == "static_recordings" else min(dense.get(key, value), value)
        if keep is not None:
            entry.update(timings[entry["model"]], static_vs_dense=beside["static"] / timings[entry["model"]]["static"])
        for label, timing in timings.items():
            print(f"{label} static: {timing['static']:.2f} ms/token ({timing['static_decode']:.2f} per decode token, "
                  f"prefill call {timing['static_prefill']:.1f} ms, {timing['static_recordings']} recordings in "
                  f"timed calls)", flush=True)
        models = timings = sparse = None
        gc.collect()
        torch.cuda.empty_cache()


def profile_host(model, prompt: torch.Tensor, new_tokens: int, label: str, static: bool = False,
                 top: int = 25) -> str:
    """cProfile of one ``model.generate`` (after warm-up calls; ``static``: ``cache_implementation="static"``, whose
    decode forward transformers compiles): where the host time of a decode step goes. Returns the report (functions
    by own time, then by cumulative time), also written to ``host_profile_<way>_<label>.json`` beside the results.

    Warm-up calls go on until one records no CUDA graph (`warm_up_generate`); the report says how many the
    profiled call recorded."""
    import cProfile
    import io
    import pstats

    kwargs = generate_kwargs(new_tokens, static)
    if static:
        torch._dynamo.reset()
    with torch.no_grad():
        warmups = warm_up_generate(model, prompt, kwargs, 2 if static else 1)  # the first static call compiles
        torch.cuda.synchronize()
        profiler = cProfile.Profile()
        with counting_graph_recordings() as recorded:
            profiler.enable()
            model.generate(prompt, **kwargs)
            torch.cuda.synchronize()
            profiler.disable()
    stream = io.StringIO()
    stream.write(f"{label}: {warmups} warm-up calls; CUDA graphs recorded in the profiled call: {recorded[0]}\n")
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    report = stream.getvalue()
    way = "static" if static else "eager"
    write_json(f"host_profile_{way}_{label.replace(' ', '_')}.json", {"model": label, "way": way,
                                                                       "tokens": new_tokens, "warmup_calls": warmups,
                                                                       "graphs_recorded": recorded[0],
                                                                       "report": report})
    return report


def _kernel_times(prof) -> dict[str, list]:
    """``{kernel name: [calls, µs]}`` of the CUDA kernels a torch.profiler session saw."""
    kernels: dict[str, list] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels.setdefault(event.name[:90], [0, 0.0])
            entry[0] += 1
            entry[1] += event.device_time
    return kernels


def _kernel_report(kernels: dict[str, list], steps: float, layers: int, heading: str, top: int) -> list[str]:
    """Report lines of `_kernel_times` spread over ``steps`` decode steps: a heading with kernels and µs of kernel
    time per layer (and, with programmatic dependent launch on, a line saying what that does to the times), then
    the ``top`` kernels by time."""
    per_step = sum(t for _, t in kernels.values()) / steps
    count = sum(c for c, _ in kernels.values()) / steps
    lines = [f"{heading}, {count / layers:.1f} kernels and {per_step / layers:.1f} µs of kernel time per layer "
             f"({per_step:.0f} µs per step)"]
    if pdl_enabled():  # (see the module's docstring)
        lines.append("  (programmatic dependent launch on: our kernels' times include their wait for the kernel "
                     "before; QSPARSE_PDL=0 times each alone)")
    for name, (calls, total) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{calls / steps / layers:6.2f}/layer {total / steps / layers:8.2f} µs/layer "
                     f"{total / calls if calls else 0.0:7.2f} µs/call  {name}")
    return lines


def profiled_compiled_steps(model, prompt: torch.Tensor, steps: int):
    """A torch.profiler session (CUDA kernels) of ``steps`` replays of the compiled decode step (reduce-overhead),
    after its compilation, warm-up and recording."""
    from torch.profiler import ProfilerActivity, profile

    torch._dynamo.reset()
    with torch.no_grad():
        step, _ = greedy_step(model, prompt, prompt.shape[1] + 32, compiled=True)
        for _ in range(8):  # compile, warm-up and recording
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
    return prof


def kernel_profile(model, prompt: torch.Tensor, label: str, top: int = 30) -> list[str]:
    """Per-kernel time of the compiled decode step (reduce-overhead, replays profiled), per decoder layer: where a
    step's time goes. Returns the report lines (kernels by time), also written to ``kernels_<label>.json``."""
    layers = model.config.num_hidden_layers
    steps = 4
    prof = profiled_compiled_steps(model, prompt, steps)
    lines = _kernel_report(_kernel_times(prof), steps, layers, f"{label}: compiled step", top)
    write_json(f"kernels_{label.replace(' ', '_')}.json", {"model": label, "layers": layers, "lines": lines})
    return lines


def exposed_times(kernels: list[tuple[str, float, float]]) -> list[dict]:
    """Each kernel of ``(name, start, end)`` (µs, in launch order) with its ``offset`` from the first one's start, its
    ``duration`` and its ``exposed`` time: how much later it ends than every kernel before it, idle time before it
    included -- what it adds to the step's wall time. They add up to the step's span. With programmatic dependent
    launch a kernel starts while the one before it runs and waits inside it, so its duration holds that wait; its
    exposed time does not.

    Example:
        >>> [k["exposed"] for k in exposed_times([("gemv", 0.0, 10.0), ("select", 2.0, 13.0), ("gemv", 14.0, 20.0)])]
        [10.0, 3.0, 7.0]
    """
    if not kernels:
        return []
    first, ended, timed = kernels[0][1], kernels[0][1], []
    for name, start, end in kernels:
        timed.append({"name": name, "offset": start - first, "duration": end - start,
                      "exposed": max(0.0, end - ended)})
        ended = max(ended, end)
    return timed


def repeating_run(names: list[str], shortest: int = 4) -> tuple[int, int] | None:
    """``(start, length)`` of the shortest run of at least ``shortest`` kernel names, ending mid-step, that the next
    ``length`` names repeat: one decoder layer's kernels in a step of many identical layers. None where no run
    repeats (a step of few layers, whose first and last differ from the rest).

    Example:
        >>> repeating_run(["embed"] + ["norm", "gemv", "attn", "gemv"] * 3 + ["head"])
        (3, 4)
    """
    middle = len(names) // 2
    for length in range(shortest, middle + 1):
        start = middle - length
        if names[start:start + length] == names[middle:middle + length]:
            return start, length
    return None


def timed_steps(prof, steps: int) -> list[list[dict]]:
    """The `exposed_times` of each of ``steps`` profiled decode steps' kernels (a torch.profiler session's CUDA
    kernels in launch order, split into ``steps`` equal runs)."""
    events = sorted((event for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda event: event.time_range.start)
    per_step = len(events) // steps
    return [exposed_times([(event.name, event.time_range.start, event.time_range.end)
                           for event in events[i * per_step:(i + 1) * per_step]]) for i in range(steps)]


def random_model(arch: str, layers: int):
    """``(model, prompt)``: the 7B-shaped model of ``arch`` with ``layers`` decoder layers and random bf16 weights on
    the GPU (seed 0, SDPA attention, eval mode), and a random 32-token prompt."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(CONFIGS[arch](layers), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").eval()
    return model, torch.randint(0, model.config.vocab_size, (1, 32), device="cuda")


def kernel_timeline(model, prompt: torch.Tensor, label: str, top: int = 12) -> list[str]:
    """Where the wall time of one compiled decode step goes (`exposed_times` of its kernels, torch.profiler): one
    decoder layer's kernels in launch order (a run that repeats mid-step, `repeating_run`; every kernel of the step
    where none does), then the kernels' exposed time per layer by name. Returns the report lines, also written with
    the whole step to ``timeline_<label>.json``."""
    layers = model.config.num_hidden_layers
    timed = timed_steps(profiled_compiled_steps(model, prompt, 3), 3)[1]  # the middle step of three
    span = sum(kernel["exposed"] for kernel in timed)
    run = repeating_run([kernel["name"] for kernel in timed])
    start, length = run or (0, len(timed))
    shown = timed[start:start + length]
    lines = [f"{label}: one compiled step, {span:.1f} µs over {len(timed)} kernels; "
             + (f"one decoder layer (a run of {length} kernels that repeats mid-step): "
                f"{sum(kernel['exposed'] for kernel in shown):.1f} µs" if run else "every kernel (no run repeats)"),
             "  offset µs  duration µs  exposed µs  kernel"]
    offset = shown[0]["offset"] if shown else 0.0
    lines += [f"  {kernel['offset'] - offset:9.1f}  {kernel['duration']:11.2f}  {kernel['exposed']:10.2f}  "
              f"{kernel['name'][:90]}" for kernel in shown]
    by_name: dict[str, float] = {}
    for kernel in timed:
        by_name[kernel["name"][:90]] = by_name.get(kernel["name"][:90], 0.0) + kernel["exposed"]
    lines.append(f"  exposed µs per layer by kernel ({layers} layers):")
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    lines += [f"  {total / layers:9.2f}  {name}" for name, total in ranked]
    write_json(f"timeline_{label.replace(' ', '_')}.json", {"model": label, "layers": layers, "lines": lines,
                                                            "kernels": timed})
    return lines


class StopAfter(StoppingCriteria):
    """Stops ``generate`` once sequences are ``length`` tokens long, whatever ``max_new_tokens`` says: calls that
    stop at different lengths keep the static cache's shape (and so its compiled graphs)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool,
                          device=input_ids.device)


def per_token_difference(short: dict[str, list], long: dict[str, list]) -> dict[str, list]:
    """``long - short`` per kernel (`_kernel_times` of two calls that differ only in their number of decode
    steps): the kernels of the extra decode steps, the prefill and set-up common to both cancelled out."""
    absent = (0, 0.0)
    return {name: [after - before for after, before in zip(long.get(name, absent), short.get(name, absent))]
            for name in dict.fromkeys([*long, *short])}


def generate_kernel_profile(model, prompt: torch.Tensor, label: str, new_tokens: int = 64, short: int = 8,
                            long: int = 40, top: int = 30) -> list[str]:
    """What ``generate(..., cache_implementation="static")`` runs per decode token, for comparison with
    `kernel_profile`'s step: two profiled calls that stop after ``short`` and ``long`` new tokens (same cache, same
    graphs), differenced per kernel and divided by ``long - short``, with the wall time per token taken the same
    way (no prefill in either). Also written to ``kernels_static_<label>.json``."""
    if not 0 < short < long <= new_tokens:
        raise ValueError(f"generate_kernel_profile needs 0 < short < long <= new_tokens, got short={short}, "
                         f"long={long}, new_tokens={new_tokens}")
    from torch.profiler import ProfilerActivity, profile

    kwargs = generate_kwargs(new_tokens, static=True)
    torch._dynamo.reset()
    layers = model.config.num_hidden_layers
    kernels, wall = {}, {}
    with torch.no_grad():
        warm_up_generate(model, prompt, kwargs, 2)
        for tokens in (short, long):
            stop = StoppingCriteriaList([StopAfter(prompt.shape[1] + tokens)])
            warm_up_generate(model, prompt, dict(kwargs, stopping_criteria=stop), 1)
            wall[tokens] = _timed_generate(model, prompt, dict(kwargs, stopping_criteria=stop))
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model.generate(prompt, **kwargs, stopping_criteria=stop)
                torch.cuda.synchronize()
            kernels[tokens] = _kernel_times(prof)
    steps = long - short
    wall_ms = (wall[long] - wall[short]) * 1000 / steps
    lines = _kernel_report(per_token_difference(kernels[short], kernels[long]), steps, layers,
                           f"{label}: generate(static), {wall_ms:.2f} ms wall per decode token", top)
    write_json(f"kernels_static_{label.replace(' ', '_')}.json",
               {"model": label, "layers": layers, "wall_ms_per_token": wall_ms, "lines": lines})
    return lines


def prefill_profile(model, prompt: torch.Tensor, label: str, top: int = 20, calls: int = 3) -> list[str]:
    """Where the prefill call of ``generate(..., cache_implementation="static")`` goes (``max_new_tokens=1``, as
    `generate_static_side_by_side` times it; transformers runs the prefill eagerly): its wall time, the GPU's kernel
    time in it (a call whose kernels take far less than its wall time waits on the host), the kernels by time per
    layer, and the host's operators by their own time. Of ``calls`` profiled calls the one with the least host time
    is reported: one call on a busy host makes every operator slower (a converted model's profile once showed each
    of its dense operators at 1.5-2.2 times dense's own time, a view 3.4 against 1.6 µs), which hides what the
    converted model itself adds. Also written to ``kernels_prefill_<label>.json``."""
    from torch.profiler import ProfilerActivity, profile

    kwargs = generate_kwargs(1, static=True)
    layers = model.config.num_hidden_layers
    prof, host_us = None, float("inf")
    with torch.no_grad():
        warm_up_generate(model, prompt, kwargs, 2)
        wall_ms = min(_timed_generate(model, prompt, kwargs) for _ in range(3)) * 1000
        for _ in range(calls):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as candidate:
                model.generate(prompt, **kwargs)
                torch.cuda.synchronize()
            candidate_us = sum(event.self_cpu_time_total for event in candidate.key_averages())
            if candidate_us < host_us:
                prof, host_us = candidate, candidate_us
    lines = _kernel_report(_kernel_times(prof), 1, layers,
                           f"{label}: prefill call of generate(static), {wall_ms:.1f} ms wall", top)
    host = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    write_json(f"kernels_prefill_{label.replace(' ', '_')}.json",
               {"model": label, "layers": layers, "wall_ms": wall_ms, "lines": lines, "host_ops": host})
    return lines + [host]


def kernels_per_layer(model, prompt: torch.Tensor) -> float:
    """CUDA kernels launched by one eager decode step (static cache), divided by the number of decoder layers."""
    from torch.profiler import ProfilerActivity, profile

    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + 8)
    with torch.no_grad():
        model(prompt, past_key_values=cache, cache_position=torch.arange(prompt.shape[1], device="cuda"))
        token = prompt[:, -1:]
        position = torch.tensor([prompt.shape[1]], device="cuda")
        model(token, past_key_values=cache, cache_position=position)  # lazy set-up outside the profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(token, past_key_values=cache, cache_position=position + 1)
            torch.cuda.synchronize()
    launched = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return launched / model.config.num_hidden_layers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=list(CONFIGS), default="mistral")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the 7B model's)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--keeps", default="1.0,0.9,0.7,0.5")
    parser.add_argument("--ways", default="graph,compile",
                        help="comma-separated subset of graph, compile, compile2 to compile13 (decode step), eager, "
                             "eager2, static (model.generate)")
    parser.add_argument("--generate", action="store_true", help="same as adding eager,static to --ways")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of eager generate() over all models, dense and sparse alternated, and of "
                             "generate(static) of each keep beside dense (best kept)")
    parser.add_argument("--count-kernels", action="store_true", help="kernels per layer of an eager decode step")
    parser.add_argument("--profile-host", action="store_true",
                        help="print where the host time of eager generate() goes (cProfile, own time per function), "
                             "and of generate(static) when --ways has static")
    parser.add_argument("--profile-kernels", action="store_true",
                        help="print the kernels of the compiled decode step by time, per layer (torch.profiler), "
                             "and of a decode token and the prefill call of generate(static) when --ways has "
                             "static")
    parser.add_argument("--timeline", action="store_true",
                        help="print where the wall time of the compiled decode step goes: one layer's kernels in "
                             "launch order with the time each adds to the step (PDL waits excluded)")
    parser.add_argument("--inductor-pdl", choices=("on", "off"), default="on",
                        help="programmatic dependent launch for Inductor's kernels (compiled ways; Hopper and later)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode needs a CUDA GPU; none found.", file=sys.stderr)
        return 2
    ways = [w for w in args.ways.split(",") if w] + (["eager", "static"] if args.generate else [])
    ways = list(dict.fromkeys(ways))
    modes = [w for w in ways if w in STEP_WAYS]
    if not modes or set(ways) - {*STEP_WAYS, *HOST_BOUND, "static"}:
        print(f"--ways takes {', '.join((*STEP_WAYS, *HOST_BOUND, 'static'))} (one of the first {len(STEP_WAYS)} "
              f"at least), got {args.ways!r}", file=sys.stderr)
        return 2
    keeps = [float(k) for k in args.keeps.split(",") if k]
    if args.rounds < 1:
        print(f"--rounds must be at least 1, got {args.rounds}", file=sys.stderr)
        return 2
    layers = args.layers or LAYERS[args.arch]
    inductor_pdl = args.inductor_pdl == "on" and set_inductor_pdl()
    model, prompt = random_model(args.arch, layers)
    model.generation_config.pad_token_id = 0
    params = sum(p.numel() for p in model.parameters())

    results = [{"model": "dense"}] + [{"model": f"qsparse keep {keep}"} for keep in keeps]

    def measure_generate(entry: dict, way: str) -> None:  # eager ways, sampled in several rounds
        single_launch = kernels.SELECT_IN_GEMV
        kernels.SELECT_IN_GEMV = single_launch and way != "eager2"
        try:
            sample = generate_ms_per_token(model, prompt, min(args.new_tokens, 128))
        finally:
            kernels.SELECT_IN_GEMV = single_launch
        entry[way] = min(entry.get(way, float("inf")), sample)
        print(f"{entry['model']} {way}: {sample:.2f} ms/token", flush=True)

    def measure(index: int, label: str) -> None:
        entry = results[index]
        for way in modes:
            entry[way] = decode_ms_per_token(model, prompt, args.new_tokens, way)
            print(f"{label} {way}: {entry[way]:.2f} ms/token", flush=True)

    def diagnose(label: str, entry: dict) -> None:
        if args.count_kernels:
            entry["kernels_per_layer"] = kernels_per_layer(model, prompt)
        if args.profile_host:
            for static in (False, True) if "static" in ways else (False,):
                print(profile_host(model, prompt, 32, label, static=static), flush=True)
        if args.timeline:
            print("\n".join(kernel_timeline(model, prompt, label)), flush=True)
        if args.profile_kernels:
            print("\n".join(kernel_profile(model, prompt, label)), flush=True)
            if "static" in ways:
                print("\n".join(generate_kernel_profile(model, prompt, label)), flush=True)
                print("\n".join(prefill_profile(model, prompt, label)), flush=True)

    def for_each_model(work) -> None:
        """``work(index, label)`` for the dense model, then for each keep setting converted (and reverted)."""
        work(0, results[0]["model"])
        for index, keep in enumerate(keeps, 1):
            convert_to_qsparse(model, topk=keep)  # sparsity tracking stays on, as users have it (graphs skip it)
            prepare_for_decode(model)
            work(index, results[index]["model"])
            revert_qsparse(model)
            gc.collect()
            torch.cuda.empty_cache()

    # Eager generate() first, every model once per round, best call kept: it is bound by the host's CPU, whose
    # speed drifts by tens of percent (after compilations, profiler sessions, or with nothing changed), so only
    # samples taken side by side, before anything else, compare.
    def measure_host_bound(index: int, label: str) -> None:
        for way in ways:
            if way in HOST_BOUND:
                measure_generate(results[index], way)

    for _ in range(args.rounds if any(way in HOST_BOUND for way in ways) else 0):
        for_each_model(measure_host_bound)
    for_each_model(measure)
    dense = results[0]
    if "static" in ways:
        measure_static_side_by_side(model, prompt, keeps, results, min(args.new_tokens, 128), args.rounds)
    # Profilers only after every timing: a probe timed eager generate() at 20.6 ms/token before a torch.profiler
    # session and 27.7 after it, in one process (single calls vary by ~20 %, so not settled): no model is timed
    # after a profiler ran, which with the count inside each model's turn put every model but the first after one.
    if args.count_kernels or args.profile_host or args.profile_kernels or args.timeline:
        for_each_model(lambda index, label: diagnose(label, results[index]))

    baseline_way = min(modes, key=lambda m: dense[m])
    baseline = dense[baseline_way]
    names = {"graph": "step in CUDA graph", "compile": "step compiled",
             "compile2": "step compiled, activation unfused", "compile3": "step compiled, FFN in two launches",
             "compile4": "step compiled, FFN in three launches", "compile6": "step compiled, SDPA attention",
             "compile7": "step compiled, rotary and append apart", "compile8": "step compiled, no GEMV prefetch",
             "compile9": "step compiled, no down prefetch", "compile10": "step compiled, norms apart",
             "compile12": "step compiled, attention prefetch",
             "compile13": "step compiled, activation selected in one launch",
             "eager": "generate()",
             "eager2": "generate(), selection launched apart", "static": "generate(static)"}
    headers = ["model"] + [f"{names[w]} ms/token" for w in ways] + [f"speedup vs best dense ({baseline_way})"]
    headers += [f"{names[w]} vs dense" for w in ways] + (["kernels/layer"] if args.count_kernels else [])
    rows = []
    for entry in results:
        best = min(entry[m] for m in modes)
        entry["speedup_vs_best_dense"] = baseline / best
        for way in ways:
            entry.setdefault(f"{way}_vs_dense", dense[way] / entry[way])  # static: against its own dense sample
        rows.append([entry["model"]] + [f"{entry[w]:.2f}" for w in ways] + [f"{baseline / best:.2f}×"]
                    + [f"{entry[f'{w}_vs_dense']:.2f}×" for w in ways]
                    + ([f"{entry['kernels_per_layer']:.1f}"] if args.count_kernels else []))
    print_table(headers, rows,
                title=f"Decode, {args.arch} {params / 1e9:.2f}B ({layers} layers), bf16, batch 1, {args.new_tokens} "
                      f"tokens (generate: {min(args.new_tokens, 128)}), {torch.cuda.get_device_name()}; programmatic "
                      f"dependent launch: ours {'on' if pdl_enabled() else 'off'}, Inductor's "
                      f"{'on' if inductor_pdl else 'off'}")
    write_json(f"decode_{args.arch}_{'-'.join(ways)}.json", {"arch": args.arch, "params": params, "layers": layers,
                                            "new_tokens": args.new_tokens, "baseline": baseline_way,
                                            "qsparse_version": qsparse_hf.__version__, "torch": torch.__version__,
                                            "inductor_pdl": inductor_pdl, "qsparse_pdl": pdl_enabled(),
                                            "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
