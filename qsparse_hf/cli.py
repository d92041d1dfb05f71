"""The ``qsparse`` command line: ``qsparse scaling``, ``qsparse convert``, ``qsparse report``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main"]


def _scaling(args: argparse.Namespace) -> int:
    from . import scaling

    law = scaling.law_for(args.precision, calibrated=not args.printed_constants)
    best = scaling.best_config_for_budget(law, args.budget)
    print(f"law: {law}  ({'printed, rounded' if args.printed_constants else 'calibrated to the paper S*'})")
    print(f"inference-optimal sparsity S* = {100 * best['sparsity']:.2f}%")
    print(f"for {args.budget:.3g} activated parameters: total {best['params']:.3g} parameters "
          f"({best['params'] / args.budget:.2f}x), predicted loss {best['loss']:.4f} "
          f"vs dense {best['dense_loss_same_budget']:.4f}")
    if args.plot:
        print("plot:", scaling.plot_scaling_law(law, args.plot))
    return 0


def _load(model_id: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qsparse_hf  # noqa: F401  (registers quant_method "qsparse" before loading)

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as err:
        raise SystemExit(f"qsparse: cannot load {model_id!r} as a causal LM: {err}") from None
    return model.eval(), tokenizer


def _convert(args: argparse.Namespace) -> int:
    from . import convert_to_qsparse

    model, tokenizer = _load(args.model, args.dtype)
    options = {"ffn_topk": args.ffn_topk} if args.ffn_topk is not None else {}
    convert_to_qsparse(model, topk=args.topk, **options)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"saved Q-Sparse checkpoint (topk={args.topk}) to {args.output}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from . import convert_to_qsparse, is_qsparse_model, sparsity_report

    model, tokenizer = _load(args.model, args.dtype)
    if not is_qsparse_model(model):
        if args.topk is None:
            raise SystemExit(f"qsparse: {args.model} is not a Q-Sparse checkpoint; pass --topk to convert it first")
        convert_to_qsparse(model, topk=args.topk)
    text = Path(args.text_file).read_text()
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[:, : args.max_tokens]
    report = sparsity_report(model, ids)
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    if args.plot:
        from .callbacks import plot_sparsity_heatmap

        print("heatmap:", plot_sparsity_heatmap(report, args.plot))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qsparse", description="Q-Sparse tools for Hugging Face causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("scaling", help="inference-optimal sparsity and model size for an activated-parameter budget")
    p.add_argument("--budget", type=float, default=7e9, help="activated parameters per token (default 7e9)")
    p.add_argument("--precision", choices=["full", "1.58"], default="full", help="weight precision of the law")
    p.add_argument("--printed-constants", action="store_true",
                   help="use the paper's rounded constants as printed (S* = 50.2%% instead of 45.58%%)")
    p.add_argument("--plot", help="write a PNG of loss vs activated parameters here")
    p.set_defaults(func=_scaling)

    p = sub.add_parser("convert", help="load a model (hub id or path), convert it, save a Q-Sparse checkpoint")
    p.add_argument("model")
    p.add_argument("--topk", type=float, default=0.7, help="fraction of each projection's input kept per token")
    p.add_argument("--ffn-topk", type=float, help="keep fraction after the FFN activation (default: --topk)")
    p.add_argument("--output", required=True, help="directory for the converted checkpoint")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=_convert)

    p = sub.add_parser("report", help="measured per-projection sparsity and activated parameters on real text")
    p.add_argument("model")
    p.add_argument("--text-file", required=True, help="plain text run through the model")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--topk", type=float, help="convert a dense model at this keep fraction first")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--plot", help="write a layer x projection heatmap PNG here")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qsparse`` console script.

    Example:
        >>> main(["scaling", "--budget", "4e9"])  # doctest: +ELLIPSIS
        law: ...
        inference-optimal sparsity S* = 45.58%
        for 4e+09 activated parameters: total 7.35e+09 parameters (1.84x), ...
        0
    """
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
