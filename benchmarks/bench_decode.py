"""End-to-end decode: a 7B-shaped model (random bf16 weights), batch 1, HF static cache, dense vs Q-Sparse.

Each decode step (model forward + greedy argmax) is captured once in a CUDA graph and replayed, for dense and sparse
alike, so launch overhead does not hide the memory traffic the sparsity saves. Prints ms/token and speedup per keep
ratio and writes decode_<arch>.json.

    python benchmarks/bench_decode.py --arch mistral --new-tokens 256
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import print_table, write_json  # noqa: E402

from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config, StaticCache  # noqa: E402

import qsparse_hf  # noqa: E402
from qsparse_hf import convert_to_qsparse, revert_qsparse, set_sparsity_tracking  # noqa: E402
from qsparse_hf.kernels import prepare_for_decode  # noqa: E402

CONFIGS = {
    "mistral": lambda layers: MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                                            num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    "qwen2": lambda layers: Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers,
                                        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
}


def decode_ms_per_token(model, prompt: torch.Tensor, new_tokens: int, compile: bool = False) -> float:
    """Prefill eagerly, then time ``new_tokens`` greedy steps replayed from one captured CUDA graph (of the
    ``torch.compile``-d forward with ``compile``)."""
    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new_tokens + 8)
    # With compile, Inductor's own CUDA graphs ("reduce-overhead") replace the manual capture below.
    forward = (torch.compile(model.forward, mode="reduce-overhead", dynamic=False, fullgraph=True) if compile
               else model.forward)
    with torch.no_grad():
        logits = model(prompt, past_key_values=cache, use_cache=True,
                       cache_position=torch.arange(prompt.shape[1], device="cuda")).logits
        token = logits[:, -1:].argmax(-1)
        position = torch.tensor([prompt.shape[1]], device="cuda")

        def step():
            out = forward(token, past_key_values=cache, cache_position=position, use_cache=True).logits
            token.copy_(out[:, -1:].argmax(-1))
            position.add_(1)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: lazy weight re-layout, kernel compilation and tuning happen here
                step()
        torch.cuda.current_stream().wait_stream(stream)
        if compile:
            for _ in range(3):
                step()
            replay = step
        else:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            replay = graph.replay
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        position.fill_(prompt.shape[1] + 3)
        start.record()
        for _ in range(new_tokens):
            replay()
        end.record()
        end.synchronize()
    return start.elapsed_time(end) / new_tokens


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=list(CONFIGS), default="mistral")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the 7B model's)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--keeps", default="0.9,0.7,0.5")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the forward (fuses norms, rotary, residuals) before graph capture")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode needs a CUDA GPU; none found.", file=sys.stderr)
        return 2
    layers = args.layers or (32 if args.arch == "mistral" else 28)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(CONFIGS[args.arch](layers), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").eval()
    params = sum(p.numel() for p in model.parameters())
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), device="cuda")
    dense_ms = decode_ms_per_token(model, prompt, args.new_tokens, args.compile)
    rows = [["dense", f"{dense_ms:.2f}", f"{1000 / dense_ms:.0f}", "1.00×"]]
    results = [dict(keep=1.0, ms_per_token=dense_ms)]
    for keep in [float(k) for k in args.keeps.split(",")]:
        convert_to_qsparse(model, topk=keep)
        set_sparsity_tracking(model, False)
        prepare_for_decode(model)
        torch._dynamo.reset()
        ms = decode_ms_per_token(model, prompt, args.new_tokens, args.compile)
        results.append(dict(keep=keep, ms_per_token=ms, speedup=dense_ms / ms))
        rows.append([f"qsparse keep {keep}", f"{ms:.2f}", f"{1000 / ms:.0f}", f"{dense_ms / ms:.2f}×"])
        revert_qsparse(model)
        gc.collect()
    print_table(["model", "ms/token", "tokens/s", "speedup vs dense"], rows,
                title=f"Decode, {args.arch} {params / 1e9:.1f}B ({layers} layers), bf16, batch 1, "
                      f"{args.new_tokens} tokens, static cache + {'torch.compile reduce-overhead' if args.compile else 'CUDA graph'}, "
                      f"{torch.cuda.get_device_name()}")
    write_json(f"decode_{args.arch}{'_compiled' * args.compile}.json", {"arch": args.arch, "compile": args.compile, "params": params, "layers": layers,
                                            "new_tokens": args.new_tokens, "qsparse_version": qsparse_hf.__version__,
                                            "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
