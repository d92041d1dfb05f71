"""Host time of one compiled decode call: what Dynamo's guards and the CUDA-graph launch cost the CPU (a diagnostic).

transformers' compiled ``generate(cache_implementation="static")`` synchronises at every token (its stopping
check), so the host time of each compiled call adds to the GPU time instead of hiding behind it: a sparse model
whose kernels save 0.8 ms per token but whose call costs the CPU more than the dense model's gives part of it back.
For a few layers of a 7B-shaped model (random bf16 weights), batch 1, one token per call on a static cache, this
prints the median host time of one call (synchronised before, not after: the GPU work is left running) and the
GPU time per call, for the dense model, the Q-Sparse model, and the Q-Sparse model compiled again with every
Dynamo guard dropped (``guard_filter_fn``: unsafe, for measurement only; what fewer guards could save at most).
Each is compiled as transformers compiles it (``torch.compile(model.__call__, mode="reduce-overhead")``, the
forward hooks left outside), one after the other with Dynamo reset in between, and the dense model is measured
again at the end: the device machine's host drifts by tens of percent between runs, so compare within one run.

``--cpu`` measures the host work alone on a machine without a GPU: a small model of the same architecture (hidden
size 256) through Triton's interpreter, compiled with a backend that replays the outputs of its first call, so a
call runs no kernel at all and what is timed is Dynamo's guards and the call around them (no GPU column).

    python benchmarks/bench_compiled_host.py --arch qwen2 --layers 8 --keep 0.5
    QSPARSE_KERNELS=interpret TRITON_INTERPRET=1 python benchmarks/bench_compiled_host.py --cpu --layers 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import ms_per_call, print_table, write_json  # noqa: E402
from bench_decode import CONFIGS  # noqa: E402

from transformers import AutoModelForCausalLM, StaticCache  # noqa: E402

from qsparse_hf import convert_to_qsparse  # noqa: E402
from qsparse_hf.kernels import prepare_for_decode  # noqa: E402


def drop_all_guards(entries) -> list[bool]:
    """A ``guard_filter_fn`` that keeps no guard (measurement only: the compiled code then runs whatever it is
    given)."""
    return [False] * len(entries)


#: The ``--cpu`` model's sizes: small enough for Triton's interpreter, the architecture's layer structure kept.
SMALL = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             vocab_size=1000)


def replaying_backend(graph, example_inputs):
    """A ``torch.compile`` backend that runs the graph once and then returns those outputs at every call (timing
    only: what is left of a call is Dynamo's guards and the call itself)."""
    outputs = graph(*example_inputs)
    return lambda *args: outputs


def compiled_decode_call(model, prompt: torch.Tensor, backend="inductor", guard_filter=None,
                         max_cache_len: int = 1024):
    """Prefill ``prompt`` eagerly into a fresh static cache and compile ``model.__call__`` as transformers does;
    returns ``call()``, one compiled one-token decode call at the next position (each call moves on by one, so
    ``max_cache_len`` bounds the calls; the cost of a call does not depend on its position). Dynamo is reset first.
    Call under ``torch.no_grad()``."""
    torch._dynamo.reset()
    options = dict(backend=backend, dynamic=False, fullgraph=True)
    if guard_filter is not None:  # (torch.compile takes a mode or options, not both: reduce-overhead as an option)
        options["options"] = {"guard_filter_fn": guard_filter,
                              **({"triton.cudagraphs": True} if backend == "inductor" else {})}
    elif backend == "inductor":
        options["mode"] = "reduce-overhead"
    forward = torch.compile(model.__call__, **options)
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    model(prompt, past_key_values=cache, cache_position=torch.arange(prompt.shape[1], device=prompt.device))
    token = prompt[:, -1:].clone()
    position = torch.tensor([prompt.shape[1]], device=prompt.device)

    def call():
        logits = forward(token, past_key_values=cache, cache_position=position, use_cache=True).logits
        position.add_(1)
        return logits

    return call


def host_us_per_call(call, calls: int = 100, warmup: int = 4) -> float:
    """Median host time of ``call()`` in µs, the device synchronised before each call and not after."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        call()
    times = []
    for _ in range(calls):
        sync()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    sync()
    return statistics.median(times) * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=list(CONFIGS), default="qwen2")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--calls", type=int, default=100, help="timed calls per model (the median is reported)")
    parser.add_argument("--cpu", action="store_true",
                        help="host work only, on this CPU: a small model through Triton's interpreter, outputs "
                             "replayed (needs QSPARSE_KERNELS=interpret TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    if args.layers < 1 or args.calls < 1 or not 0 < args.keep <= 1:
        print(f"--layers and --calls must be at least 1 and --keep in (0, 1], got {args.layers}, {args.calls}, "
              f"{args.keep}", file=sys.stderr)
        return 2
    interpreted = os.environ.get("QSPARSE_KERNELS") == "interpret" and os.environ.get("TRITON_INTERPRET") == "1"
    if args.cpu and not interpreted:
        print("--cpu runs the decode path through Triton's interpreter: set QSPARSE_KERNELS=interpret and "
              "TRITON_INTERPRET=1 in the environment.", file=sys.stderr)
        return 2
    if not (args.cpu or torch.cuda.is_available()):
        print("bench_compiled_host needs a CUDA GPU; none found (--cpu times the host work alone).", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    device = "cpu" if args.cpu else "cuda"
    config = CONFIGS[args.arch](args.layers)
    if args.cpu:
        config = type(config)(**{**config.to_dict(), **SMALL})
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device=device)
    rows, results = [], []

    def measure(label: str, guard_filter=None) -> None:
        with torch.no_grad():
            call = compiled_decode_call(model, prompt, backend=replaying_backend if args.cpu else "inductor",
                                        guard_filter=guard_filter,
                                        max_cache_len=prompt.shape[1] + args.calls + 64)  # warm-up, GPU timing
            host = host_us_per_call(call, args.calls)
            gpu = None if args.cpu else ms_per_call(call, 30)
        results.append({"model": label, "host_us": host, "gpu_ms": gpu})
        gpu_text = "n/a" if gpu is None else f"{gpu:.3f}"
        rows.append([label, f"{host:.0f}", f"{host / args.layers:.1f}", gpu_text])
        print(f"{label}: {host:.0f} µs host, {gpu_text} ms GPU per call", flush=True)

    measure("dense")
    convert_to_qsparse(model, topk=args.keep)
    prepare_for_decode(model)
    measure(f"qsparse keep {args.keep}")
    measure(f"qsparse keep {args.keep}, no guards", drop_all_guards)
    from qsparse_hf import revert_qsparse

    revert_qsparse(model)
    measure("dense again")
    where = "CPU, small model, outputs replayed" if args.cpu else torch.cuda.get_device_name()
    print_table(["model", "host µs per call", "per layer", "GPU ms per call"], rows,
                title=f"Compiled decode call, {args.arch} ({args.layers} layers), bf16, batch 1, {where}, "
                      f"torch {torch.__version__}")
    write_json(f"compiled_host_{args.arch}{'_cpu' if args.cpu else ''}.json",
               {"arch": args.arch, "layers": args.layers, "keep": args.keep, "device": where,
                "torch": torch.__version__, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
