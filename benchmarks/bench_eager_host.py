"""Where an eager decode step's time goes: the GPU or the host, our launches or the code around them (a diagnostic).

Eager ``model.generate()`` runs one Python forward per token; on a fast GPU it is bound by host time, so its speed
is decided by what each call costs the CPU, not by the bytes the kernels read. Three tables, for a few layers of a
7B-shaped model (random bf16 weights), batch 1, one token per step on a static cache. Every number is the best of
``--repeats`` runs, dense and Q-Sparse alternated (the device machine's host is noisy: the same call varies by
~20% from one run to the next).

1. **wall vs GPU**: ms per eager step, and the kernel time the GPU spends in it (torch.profiler). A step whose kernel
   time is far below its wall time is bound by host time.
2. **skips**: the Q-Sparse step with part of its decode path skipped, outputs left uninitialised (timing only):
   our Triton launches; our GEMVs (their outputs allocated, not computed); the whole decode path (a plain
   ``F.linear`` in every converted linear, the activation without top-K). What a part costs is the step time it
   takes away.
3. **injected calls**: the dense step with five extra calls before every MLP: ``x.add_(0)``, an empty Triton kernel
   through `KernelLaunch`, a Triton copy kernel moving as many bytes as the sparse GEMV reads, a cuBLAS matmul of
   the up projection's shape, our sparse GEMV of that shape, the same GEMV selecting its input's top-K. The step
   time each adds per call, beside what the call costs alone in a loop, says whether a launch of ours (or any
   Triton launch, or any heavy kernel) costs the host more inside a model than its own call.

    python benchmarks/bench_eager_host.py --arch mistral --layers 8 --keep 0.5
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import print_table, write_json  # noqa: E402
from bench_decode import CONFIGS  # noqa: E402

from transformers import AutoModelForCausalLM, StaticCache  # noqa: E402

from qsparse_hf import convert_to_qsparse  # noqa: E402
from qsparse_hf.kernels import prepare_for_decode  # noqa: E402

PROMPT_TOKENS = 32


def _warmed_steps(model, prompt: torch.Tensor, steps: int, warmup: int):
    """Prefill ``prompt`` into a fresh static cache, run ``warmup`` one-token decode steps and synchronise; returns
    ``step(i)``, the i-th step (``warmup <= i < warmup + steps``), each at a position of its own (transformers'
    static cache writes at its running length). Call both under ``torch.no_grad()``."""
    cache = StaticCache(config=model.config, max_cache_len=PROMPT_TOKENS + warmup + steps)
    positions = torch.arange(PROMPT_TOKENS + warmup + steps, device=prompt.device)
    token = prompt[:, -1:]
    model(prompt, past_key_values=cache, cache_position=positions[:PROMPT_TOKENS])

    def step(i: int) -> None:
        model(token, past_key_values=cache, cache_position=positions[PROMPT_TOKENS + i:PROMPT_TOKENS + i + 1])

    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    return step


def step_ms(model, prompt: torch.Tensor, steps: int, warmup: int = 5) -> float:
    """Wall ms per eager one-token decode step (prefill and ``warmup`` steps untimed)."""
    with torch.no_grad():
        step = _warmed_steps(model, prompt, steps, warmup)
        start = time.perf_counter()
        for i in range(warmup, warmup + steps):
            step(i)
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / steps


def gpu_kernel_ms(model, prompt: torch.Tensor, steps: int = 5, warmup: int = 3) -> tuple[float, float]:
    """GPU kernel time (ms) and kernel count per eager decode step, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        step = _warmed_steps(model, prompt, steps, warmup)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(warmup, warmup + steps):
                step(i)
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in kernels) / steps / 1e3, len(kernels) / steps


def alone_us(call, calls: int = 2000) -> float:
    """Host µs of one ``call()`` repeated in a loop (no synchronisation inside the loop)."""
    for _ in range(20):
        call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed * 1e6 / calls


def _empty_outputs(decode_weights, x, *args, **kwargs):
    width = decode_weights.weight_t.shape[-1]
    return decode_weights._members(torch.empty(x.shape[:-1] + (width,), dtype=x.dtype, device=x.device))


def skips() -> dict[str, list[tuple[object, str, object]]]:
    """Parts of the decode path to skip: ``{label: [(class, attribute, replacement), ...]}`` (internal hooks: this
    diagnostic follows the decode path's layout, `InputSparsifier.decode` → `DecodeWeights` → `KernelLaunch`)."""
    from qsparse_hf.kernels.launch import KernelLaunch
    from qsparse_hf.layers import DecodeWeights, EagerDecodePlan, QSparseActivation, QSparseLinear

    return {
        "Triton launches skipped": [(KernelLaunch, "_launch", lambda self, grid, tensors, scalars: None)],
        # (no eager plans either: they launch without going through `DecodeWeights`)
        "GEMVs skipped (outputs allocated)": [(DecodeWeights, "multiply", _empty_outputs),
                                              (DecodeWeights, "multiply_selecting", _empty_outputs),
                                              (EagerDecodePlan, "run", lambda self, *args: None)],
        "decode path skipped (plain F.linear)": [
            (QSparseLinear, "forward", lambda self, x: F.linear(x, self.weight, self.bias)),
            (QSparseActivation, "forward", lambda self, x: self.act(x)),
        ],
    }


def injections(config, keep: float, device: str) -> dict[str, object]:
    """Calls to inject before every MLP of the dense step, each a zero-argument function."""
    import triton

    from qsparse_hf.functional import keep_count, topk_mask
    from qsparse_hf.kernels.gemv import select_gemv, sparse_gemv
    from qsparse_hf.kernels.launch import KernelLaunch
    from qsparse_hf.kernels.topk import new_hint

    import triton.language as tl

    @triton.jit
    def _empty_kernel(x_ptr):
        pass

    @triton.jit
    def _copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=offsets < n), mask=offsets < n)

    empty = KernelLaunch(_empty_kernel, dict(num_warps=1))
    copy = KernelLaunch(_copy_kernel, dict(BLOCK=4096, num_warps=8))
    hidden, inner = config.hidden_size, config.intermediate_size
    x = torch.randn(1, 1, hidden, device=device, dtype=torch.bfloat16)
    k = keep_count(keep, hidden)
    x_sparse = x * topk_mask(x, k)
    weight_t = torch.randn(hidden, inner, device=device, dtype=torch.bfloat16)
    hint = new_hint(device, 8)
    zeros = torch.zeros((), dtype=torch.int64, device=device)
    # a Triton kernel as heavy as the sparse GEMV (it moves the kept half of the weight) but not ours
    half = weight_t.flatten()[: weight_t.numel() // 2]
    half_copy = torch.empty_like(half)
    return {
        "x.add_(0)": lambda: x.add_(0),
        "empty Triton kernel": lambda: empty((1,), (x,), ()),
        f"Triton copy of half the {hidden}x{inner} weight": lambda: copy((triton.cdiv(half.numel(), 4096),),
                                                                       (half, half_copy), (half.numel(),)),
        f"cuBLAS matmul {hidden}x{inner}": lambda: torch.matmul(x, weight_t),
        f"sparse GEMV {hidden}x{inner}": lambda: sparse_gemv(x_sparse, weight_t),
        f"top-K inside the GEMV {hidden}x{inner}": lambda: select_gemv(x, k, weight_t, None, zeros, hint),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=list(CONFIGS), default="mistral")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per number (the best is kept)")
    args = parser.parse_args(argv)
    if args.layers < 1 or args.steps < 1 or args.repeats < 1 or not 0 < args.keep <= 1:
        print("--layers, --steps and --repeats take positive integers, --keep a fraction in (0, 1]", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_eager_host needs a CUDA GPU; none found.", file=sys.stderr)
        return 2
    config = CONFIGS[args.arch](args.layers)
    models = {}
    for label in ("dense", f"qsparse keep {args.keep}"):
        torch.manual_seed(0)
        with torch.device("cuda"):
            models[label] = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                             attn_implementation="sdpa").eval()
    dense, sparse = models.values()
    convert_to_qsparse(sparse, topk=args.keep)
    prepare_for_decode(sparse)
    prompt = torch.randint(0, config.vocab_size, (1, PROMPT_TOKENS), device="cuda")

    def best_of(model) -> float:
        return min(step_ms(model, prompt, args.steps) for _ in range(args.repeats))

    def alternated() -> tuple[float, float]:
        times = {"dense": [], "sparse": []}
        for _ in range(args.repeats):
            times["dense"].append(step_ms(dense, prompt, args.steps))
            times["sparse"].append(step_ms(sparse, prompt, args.steps))
        return min(times["dense"]), min(times["sparse"])

    per_layer = 1e3 / args.layers
    report = {"arch": args.arch, "layers": args.layers, "keep": args.keep, "torch": torch.__version__}
    title = (f"{args.arch}, {args.layers} layers, keep {args.keep}, bf16, batch 1, eager one-token step, "
             f"{torch.cuda.get_device_name()}")

    rows, report["wall_vs_gpu"] = [], []
    for label, model in models.items():
        wall = best_of(model)
        kernel_ms, kernels = gpu_kernel_ms(model, prompt)
        report["wall_vs_gpu"].append({"model": label, "wall_ms": wall, "gpu_kernel_ms": kernel_ms,
                                      "kernels": kernels})
        rows.append([label, f"{wall:.2f}", f"{kernel_ms:.2f}", f"{kernel_ms / wall:.0%}", f"{kernels:.0f}"])
    print_table(["model", "wall ms/step", "GPU kernel ms/step", "GPU busy", "kernels/step"], rows,
                title=f"Wall vs GPU time: {title}")

    rows, report["skips"] = [], []
    for label, patches in {"nothing skipped": [], **skips()}.items():
        with ExitStack() as stack:
            for owner, attribute, replacement in patches:
                stack.enter_context(mock.patch.object(owner, attribute, replacement))
            dense_ms, sparse_ms = alternated()
        extra = (sparse_ms - dense_ms) * per_layer
        report["skips"].append({"skipped": label, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
                                "extra_us_per_layer": extra})
        rows.append([label, f"{dense_ms:.2f}", f"{sparse_ms:.2f}", f"{extra:+.0f}"])
    print_table(["Q-Sparse step with", "dense ms/step", "Q-Sparse ms/step", "Q-Sparse − dense µs/layer"], rows,
                title=f"Parts of the decode path skipped: {title}")

    calls = injections(config, args.keep, "cuda")
    current = [lambda: None]

    def inject(module, inputs) -> None:
        for _ in range(5):
            current[0]()

    mlps = [layer.mlp for layer in dense.model.layers]
    handles = [mlp.register_forward_pre_hook(inject) for mlp in mlps]
    try:
        times = {label: [] for label in ("none", *calls)}
        for _ in range(args.repeats):
            for label in times:
                current[0] = (lambda: None) if label == "none" else calls[label]
                times[label].append(step_ms(dense, prompt, args.steps))
    finally:
        for handle in handles:
            handle.remove()
    base = min(times.pop("none"))
    rows, report["injected"] = [], {"dense_ms": base, "calls": []}
    for label, call in calls.items():
        in_step = (min(times[label]) - base) * 1e3 / (5 * len(mlps))
        alone = alone_us(call)
        report["injected"]["calls"].append({"call": label, "in_step_us": in_step, "alone_us": alone})
        rows.append([label, f"{alone:.1f}", f"{in_step:.1f}"])
    print_table(["call injected 5× before every MLP", "alone µs/call", "in the dense step µs/call"], rows,
                title=f"Injected calls (dense step {base:.2f} ms): {title}")
    write_json(f"eager_host_{args.arch}.json", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
