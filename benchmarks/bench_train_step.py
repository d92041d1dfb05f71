"""Training step time: dense vs Q-Sparse (Triton top-K and the reference top-K) on a ~1.1B Llama-shaped model.

bf16 weights, fused AdamW, sequence 2048, batch 8 (GPU-bound; at batch 1 the step is bound by Python dispatch), no activation
checkpointing, sparsity tracking on (the default, what the Trainer callback reads);
median over the timed steps after warm-up. Prints a table and writes train_step.json.

    python benchmarks/bench_train_step.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import print_table, write_json  # noqa: E402

from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from qsparse_hf import convert_to_qsparse, revert_qsparse  # noqa: E402
from qsparse_hf.kernels import set_kernels_enabled  # noqa: E402


def step_ms(model, batch, steps: int, warmup: int = 3) -> float:
    """Median wall time of forward + backward + optimizer step, synchronised."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--topk", type=float, default=0.7)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_train_step needs a CUDA GPU; none found.", file=sys.stderr)
        return 2
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=args.seq)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.train()
    params = sum(p.numel() for p in model.parameters())
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq), device="cuda")
    dense = step_ms(model, batch, args.steps)
    rows = [["dense", f"{dense:.1f}", "1.00×"]]
    results = [dict(variant="dense", ms=dense)]
    convert_to_qsparse(model, topk=args.topk)
    for name, kernels_on in (("qsparse, Triton top-K", True), ("qsparse, reference top-K (kthvalue)", False)):
        set_kernels_enabled(kernels_on)
        ms = step_ms(model, batch, args.steps)
        rows.append([f"{name} (topk {args.topk})", f"{ms:.1f}", f"{ms / dense:.2f}×"])
        results.append(dict(variant=name, ms=ms, ratio=ms / dense))
    set_kernels_enabled(True)
    revert_qsparse(model)
    print_table(["variant", "ms/step", "vs dense"], rows,
                title=f"Training step, Llama {params / 1e9:.2f}B, seq {args.seq} × batch {args.batch}, bf16, "
                      f"fused AdamW, {torch.cuda.get_device_name()}")
    write_json("train_step.json", {"params": params, "seq": args.seq, "batch": args.batch, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
