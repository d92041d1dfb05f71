"""Held-out perplexity of a causal LM converted at several topk values, without training; prints a table.

    python benchmarks/perplexity_sweep.py --model ../shared/fixtures/mistral-tiny --text-file ../shared/fixtures/heldout_text.txt
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qsparse_hf import convert_to_qsparse, revert_qsparse, sparsity_report
from qsparse_hf.evaluation import perplexity


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="hub id or local path")
    parser.add_argument("--text-file", required=True)
    parser.add_argument("--topk", type=float, nargs="+", default=[1.0, 0.9, 0.7, 0.5, 0.3])
    parser.add_argument("--max-chars", type=int, default=200_000)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    text = open(args.text_file).read()[: args.max_chars]
    sample = tokenizer(text[:20000], return_tensors="pt", verbose=False).input_ids[:, : args.block_size]
    rows = [{"topk": "dense", "ppl": perplexity(model, tokenizer, text, args.block_size, progress=True)}]
    for topk in args.topk:
        convert_to_qsparse(model, topk=topk)
        report = sparsity_report(model, sample)
        rows.append({"topk": topk, "ppl": perplexity(model, tokenizer, text, args.block_size, progress=True),
                     "overall_sparsity": report.overall, "activated_fraction": report.activated_fraction})
        revert_qsparse(model)
    dense = rows[0]["ppl"]
    print(f"\n{args.model}\n| topk | perplexity | vs dense | overall sparsity | activated linear params |")
    print("|---|---|---|---|---|")
    for row in rows:
        extra = (f"{100 * row['overall_sparsity']:.1f}% | {100 * row['activated_fraction']:.1f}%"
                 if "overall_sparsity" in row else "0% | 100%")
        print(f"| {row['topk']} | {row['ppl']:.3f} | {row['ppl'] / dense:.3f}x | {extra} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
