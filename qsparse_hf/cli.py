"""The ``qsparse`` command line: ``convert``, ``report``, ``eval``, ``bench`` and ``scaling``.

Exit codes: 0 success; 2 bad input (missing model, not a causal LM, unknown task, unreadable file); 3 something
the environment lacks (no GPU for ``bench``, ``lm_eval`` not installed for ``eval --tasks``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["main", "build_parser", "validate_args", "CliError"]

EPILOG = "exit codes: 0 ok, 2 bad input (model, task, file), 3 missing environment (GPU, lm_eval)"


class CliError(Exception):
    """A failure with a message for the user and the process exit code."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def _keep(text: str) -> float | int:
    """argparse type of --topk/--ffn-topk: a fraction in (0, 1] ("0.7") or a count K >= 2 ("64")."""
    from .config import validate_topk

    try:
        value: float | int = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number: give a fraction in (0, 1] or a count >= 2")
    try:
        return validate_topk(value)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive(kind: type, minimum: float = 1):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}")
        if not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(f"must be a finite number >= {minimum:g}, got {text}")
        return value

    return parse


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _causal_lm_config(model_id: str):
    """The model's config, after checking that it exists and is a causal LM (no weights are read)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    import qsparse_hf  # noqa: F401  (registers quant_method "qsparse" before any config is parsed)

    looks_local = model_id.startswith((".", "/", "~")) or Path(model_id).exists()
    if looks_local and not Path(model_id).expanduser().is_dir():
        raise CliError(f"model folder {model_id!r} not found (give a local folder or a hub id)")
    try:
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as err:
        raise CliError(f"cannot load {model_id!r}: {err}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise CliError(f"{model_id!r} is a {config.model_type!r} model, not a causal LM (AutoModelForCausalLM)")
    return config


def _load(model_id: str, dtype: str, topk: float | None = None, ffn_topk: float | None = None):
    """Load a causal LM and its tokenizer (hub id or path); convert it when ``topk`` is given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import convert_to_qsparse, is_qsparse_model

    _causal_lm_config(model_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=_dtype(dtype))
    except (OSError, ValueError) as err:
        raise CliError(f"cannot load {model_id!r} as a causal LM: {err}") from None
    if topk is not None and not is_qsparse_model(model):
        options = {"ffn_topk": ffn_topk} if ffn_topk is not None else {}
        convert_to_qsparse(model, topk=topk, **options)
    return model.eval(), tokenizer


def _read_text(path: str) -> str:
    """A plain UTF-8 text file's contents; empty, binary or unreadable files are bad input."""
    if not Path(path).exists():
        raise CliError(f"cannot read text file {path!r}: not found")
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise CliError(f"cannot read text file {path!r}: {err.strerror}") from None
    if b"\0" in raw:
        raise CliError(f"{path!r} is a binary file, not plain text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CliError(f"{path!r} is not UTF-8 text") from None
    if not text.strip():
        raise CliError(f"text file {path!r} is empty")
    return text


#: report --text-file: each sample gets at least this many characters.
MIN_SAMPLE_CHARS = 64


def _writable_file(path: str, flag: str) -> None:
    """An output file path whose folder exists or can be made (no ancestor is a file), and that is no folder."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise CliError(f"{flag} {path!r} is a folder; give a file name")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CliError(f"{flag} {path!r} cannot be written: {str(parent)!r} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise CliError(f"{flag} {path!r} cannot be written: no write permission in {str(parent)!r}")
            return


def _check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise CliError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, mps, ...)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {device} asks for a GPU but torch sees none (torch.cuda.is_available() is False)",
                       code=3)
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise CliError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible", code=3)


def _check_dataset_file(path: str) -> None:
    """A local --dataset must be a non-empty JSON or JSON Lines file."""
    text = _read_text(path)
    first = text.lstrip()[:1]
    try:
        if first == "[":
            json.loads(text)
        else:
            json.loads(text.strip().splitlines()[0])
    except json.JSONDecodeError as err:
        raise CliError(f"--dataset {path!r} is not JSON or JSON Lines ({err.msg} at line {err.lineno})") from None


def validate_args(args: argparse.Namespace) -> None:
    """Check every input of a ``qsparse`` command before any model is loaded; raises `CliError` (exit 2, or 3 for
    a missing GPU). Numbers are checked by the parser's types already.

    Example:
        >>> validate_args(build_parser().parse_args(["scaling", "--budget", "1e9"]))
    """
    command = args.command
    for flag in ("json", "plot"):
        if getattr(args, flag, None):
            _writable_file(getattr(args, flag), f"--{flag}")
    if command == "convert":
        output = Path(args.output).expanduser()
        if output.exists() and not output.is_dir():
            raise CliError(f"--output {args.output!r} is a file, not a folder")
        _writable_file(str(output / "config.json"), "--output")
        from .saving import holds_checkpoint

        if holds_checkpoint(output) and not args.overwrite:
            raise CliError(f"--output {args.output!r} already holds a checkpoint; pass --overwrite to replace it")
    if command == "report":
        if args.text_file:
            text = _read_text(args.text_file)
            if len(text) < args.samples * MIN_SAMPLE_CHARS:
                most = max(1, len(text) // MIN_SAMPLE_CHARS)
                raise CliError(f"--samples {args.samples} would cut {args.text_file!r} ({len(text)} characters) into "
                               f"pieces under {MIN_SAMPLE_CHARS} characters; use --samples {most} or fewer")
        elif Path(args.dataset).exists():
            if not Path(args.dataset).is_file():
                raise CliError(f"--dataset {args.dataset!r} is a folder; give a JSON/JSONL file or a hub id")
            _check_dataset_file(args.dataset)
    if command == "eval":
        if not args.tasks and not args.perplexity:
            raise CliError("nothing to evaluate: give --tasks and/or --perplexity FILE")
        if args.perplexity:
            _read_text(args.perplexity)
        if args.batch_size != "auto" and not (args.batch_size.isdigit() and int(args.batch_size) >= 1):
            raise CliError(f"--batch-size must be a positive integer or 'auto', got {args.batch_size!r}")
        _check_device(args.device)
        if args.compare:
            _causal_lm_config(args.compare)  # a wrong --compare fails now, not after the first evaluation


def _sample_texts(args: argparse.Namespace) -> list[str]:
    """Texts for ``report``: rows of --dataset (hub id or local JSON/JSONL), or --text-file."""
    if args.dataset:
        from datasets import load_dataset

        try:
            if Path(args.dataset).is_file():
                rows = load_dataset("json", data_files=args.dataset, split="train")
            else:
                rows = load_dataset(args.dataset, split=args.split, streaming=True)
        except Exception as err:  # datasets raises many types for a missing/unreachable dataset
            raise CliError(f"cannot load dataset {args.dataset!r}: {err}") from None
        texts = []
        for row in rows:
            text = row.get("text") or "\n".join(str(row[c]) for c in ("system_prompt", "question", "response")
                                                if row.get(c))
            if not text:
                raise CliError(f"dataset {args.dataset!r} has neither a 'text' column nor the Open-Orca columns")
            texts.append(text)
            if len(texts) >= args.samples:
                break
        return texts
    text = _read_text(args.text_file)
    size = max(1, len(text) // args.samples)
    return [text[i * size:(i + 1) * size] for i in range(args.samples)]


def _measure(model, tokenizer, texts: list[str], max_tokens: int, desc: str):
    import torch
    from tqdm.auto import tqdm

    from . import reset_sparsity, sparsity_report

    reset_sparsity(model)
    device = next(model.parameters()).device
    with torch.no_grad():
        for text in tqdm(texts, desc=desc, unit="sample"):
            ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[:, :max_tokens]
            if ids.numel():
                model(ids.to(device))
    return sparsity_report(model)


def _report(args: argparse.Namespace) -> int:
    from . import convert_to_qsparse, is_qsparse_model, revert_qsparse

    model, tokenizer = _load(args.model, args.dtype, args.topk)
    if not is_qsparse_model(model):
        raise CliError(f"{args.model} is not a Q-Sparse checkpoint; pass --topk to convert it first")
    texts = _sample_texts(args)
    report = _measure(model, tokenizer, texts, args.max_tokens, "sparse model")
    print(report)
    payload = {"model": args.model, "samples": len(texts), "qsparse": report.to_dict()}
    if args.dense_baseline:
        # Natural sparsity: the same model with every top-K removed (keep everything), counted the same way.
        revert_qsparse(model)
        convert_to_qsparse(model, topk=1.0)
        dense = _measure(model, tokenizer, texts, args.max_tokens, "dense baseline")
        roles = list(report.per_projection)
        print("\nDense baseline (natural zeros) vs Q-Sparse")
        print("| | " + " | ".join(roles) + " | overall | activated params |")
        print("|" + "---|" * (len(roles) + 3))
        for name, rep in (("dense", dense), ("qsparse", report)):
            cells = [f"{100 * rep.per_projection[r]:.1f}%" if r in rep.per_projection else "—" for r in roles]
            print(f"| {name} | " + " | ".join(cells)
                  + f" | {100 * rep.overall:.1f}% | {100 * rep.activated_fraction:.1f}% |")
        payload["dense_baseline"] = dense.to_dict()
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2))
    if args.plot:
        from .callbacks import plot_sparsity_heatmap

        print("heatmap:", plot_sparsity_heatmap(report, args.plot))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .hub import save_model_card

    from .saving import save_pretrained_atomic

    model, tokenizer = _load(args.model, args.dtype, args.topk, args.ffn_topk)
    save_pretrained_atomic(model, args.output, tokenizer=tokenizer)
    save_model_card(args.output, model, base_model=args.model)
    print(f"saved Q-Sparse checkpoint (topk={args.topk}) with a model card to {args.output}")
    return 0


def _lm_eval_scores(model, tokenizer, model_id: str, args: argparse.Namespace) -> dict[str, float]:
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise CliError("qsparse eval --tasks needs lm-eval: pip install 'qsparse_hf[eval]'", code=3) from None
    from .tasks import task_include_path

    manager = TaskManager(include_path=task_include_path(), verbosity="ERROR")
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise CliError(f"unknown lm-eval task(s): {', '.join(unknown)} (the offline task shipped here is "
                       f"'openorca_definitions')")
    # A saved checkpoint goes through the harness's own from_pretrained (qsparse_hf is imported, so it loads sparse);
    # a model converted on the fly is handed over as an object.
    pretrained = model_id if model is None else model
    lm = HFLM(pretrained=pretrained, tokenizer=tokenizer, batch_size=args.batch_size, device=args.device,
              dtype=args.dtype)
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=args.limit,
                              random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    scores = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name = key.split(",")[0]
            if isinstance(value, float) and not name.endswith("_stderr"):
                scores[f"{task}/{name}"] = value
    return scores


def _evaluate_one(model_id: str, args: argparse.Namespace, topk: float | None) -> dict[str, float]:
    from .evaluation import perplexity

    quantization = getattr(_causal_lm_config(model_id), "quantization_config", None)
    method = (quantization.get("quant_method") if isinstance(quantization, dict)
              else getattr(quantization, "quant_method", None))
    # A saved Q-Sparse checkpoint evaluated on tasks only is loaded by the harness itself: no second load here.
    on_disk = topk is None and method == "qsparse"
    text = _read_text(args.perplexity) if args.perplexity else None
    model = tokenizer = None
    if text is not None or not on_disk:
        model, tokenizer = _load(model_id, args.dtype, topk)
    scores: dict[str, float] = {}
    if text is not None:
        model.to(args.device)
        scores["perplexity"] = perplexity(model, tokenizer, text, block_size=args.block_size,
                                          max_blocks=args.max_blocks, progress=True)
    if args.tasks:
        scores.update(_lm_eval_scores(None if on_disk else model, tokenizer, model_id, args))
    return scores


def _eval(args: argparse.Namespace) -> int:
    columns = {args.model + (f" (topk {args.topk})" if args.topk else ""): _evaluate_one(args.model, args, args.topk)}
    if args.compare:
        columns[args.compare] = _evaluate_one(args.compare, args, None)
    metrics = list(dict.fromkeys(m for scores in columns.values() for m in scores))
    names = list(columns)
    print("| metric | " + " | ".join(names) + (" | Δ |" if len(names) == 2 else " |"))
    print("|" + "---|" * (len(names) + 1 + (len(names) == 2)))
    for metric in metrics:
        values = [columns[n].get(metric) for n in names]
        cells = [f"{v:.4f}" if v is not None else "—" for v in values]
        delta = [f"{values[0] - values[1]:+.4f}"] if len(names) == 2 and None not in values else []
        print(f"| {metric} | " + " | ".join(cells + delta) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(columns, indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch

    # compiled_host --cpu times host work alone, through Triton's interpreter (switched on for its process)
    host_only = args.which == "compiled_host" and "--cpu" in args.extra
    if not (host_only or torch.cuda.is_available()):
        raise CliError("qsparse bench needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); "
                       "the kernels' correctness tests run on CPU with TRITON_INTERPRET=1 instead (and "
                       "`qsparse bench compiled_host --cpu` times a compiled call's host work)", code=3)
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if not (folder / "run_all.sh").exists():
        raise CliError("the benchmark scripts ship with the source repository (benchmarks/); run qsparse bench from "
                       "a clone installed with pip install -e .", code=3)
    scripts = ["bench_topk", "bench_gemv", "bench_decode", "bench_train_step"] if args.which == "all" else [
        f"bench_{args.which}"]
    env = {**os.environ, "QSPARSE_KERNELS": "interpret", "TRITON_INTERPRET": "1"} if host_only else None
    failed = 0
    for script in scripts:
        print(f"== {script}", flush=True)
        failed += subprocess.call([sys.executable, str(folder / f"{script}.py"), *args.extra], env=env) != 0
    return 1 if failed else 0


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


def _add_model_args(p: argparse.ArgumentParser, dtype: str) -> None:
    p.add_argument("model", help="hub id or local folder of a causal LM (dense or a saved Q-Sparse checkpoint)")
    p.add_argument("--dtype", default=dtype, choices=["float32", "bfloat16", "float16"],
                   help=f"weights are loaded in this dtype (default {dtype})")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``qsparse`` command (every flag documented in ``--help``)."""
    parser = argparse.ArgumentParser(prog="qsparse", description="Q-Sparse tools for Hugging Face causal LMs.",
                                     epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="load a model, convert it, save a Q-Sparse checkpoint with a model card",
                       epilog=EPILOG)
    _add_model_args(p, "bfloat16")
    p.add_argument("--topk", type=_keep, default=0.7,
                   help="fraction of each projection's input kept per token (0, 1], or a count K >= 2")
    p.add_argument("--ffn-topk", type=_keep, help="keep setting after the FFN activation (default: --topk)")
    p.add_argument("--output", required=True, help="directory for the converted checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --output")
    p.set_defaults(func=_convert)

    p = sub.add_parser("report", help="Table-2 view: measured per-projection sparsity and activated parameters",
                       epilog=EPILOG)
    _add_model_args(p, "float32")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="hub dataset id or local JSON/JSONL ('text' or Open-Orca columns)")
    source.add_argument("--text-file", help="plain text file, cut into --samples pieces")
    p.add_argument("--split", default="train", help="dataset split for a hub --dataset (default train)")
    p.add_argument("--samples", type=_positive(int), default=16, help="texts run through the model (default 16)")
    p.add_argument("--max-tokens", type=_positive(int), default=512, help="tokens per sample (default 512)")
    p.add_argument("--topk", type=_keep, help="convert a dense model at this keep setting first")
    p.add_argument("--dense-baseline", action="store_true",
                   help="also measure the unconverted model's natural zeros and print both side by side")
    p.add_argument("--json", help="write the report(s) as JSON here")
    p.add_argument("--plot", help="write a layer x projection heatmap PNG here")
    p.set_defaults(func=_report)

    p = sub.add_parser("eval", help="lm-eval tasks and/or held-out perplexity, optionally against a base model",
                       epilog=EPILOG)
    _add_model_args(p, "float32")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks, e.g. arc_challenge,hellaswag,winogrande,mmlu,"
                                   "truthfulqa_mc2; 'openorca_definitions' ships with qsparse_hf and works offline")
    p.add_argument("--perplexity", metavar="FILE", help="held-out plain text file to score")
    p.add_argument("--compare", metavar="BASE", help="also evaluate this (dense) model and print both side by side")
    p.add_argument("--topk", type=_keep, help="convert MODEL at this keep setting before evaluating")
    p.add_argument("--limit", type=_positive(float, 1e-9),
                   help="lm-eval: at most this many examples per task (or a fraction)")
    p.add_argument("--batch-size", default="8", help="lm-eval batch size (an int or 'auto')")
    p.add_argument("--device", default="cpu", help="device to run on (cpu, cuda, cuda:1, ...)")
    p.add_argument("--block-size", type=_positive(int, 2), default=512, help="perplexity block length in tokens (>= 2)")
    p.add_argument("--max-blocks", type=_positive(int), help="perplexity: score at most this many blocks")
    p.add_argument("--json", help="write all scores as JSON here")
    p.set_defaults(func=_eval)

    p = sub.add_parser("bench", help="run the GPU benchmarks (kernels, decode, training step); needs CUDA",
                       epilog=EPILOG)
    p.add_argument("which", nargs="?", default="all",
                   choices=["all", "topk", "gemv", "decode", "train_step", "eager_host", "compiled_host"],
                   help="which benchmark (default all; the diagnostics eager_host, where an eager decode step's "
                        "time goes, and compiled_host, what a compiled decode call costs the host, run only when "
                        "named; compiled_host --cpu runs without a GPU)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="arguments passed on to the benchmark script")
    p.set_defaults(func=_bench)

    p = sub.add_parser("scaling", help="inference-optimal sparsity and model size for an activated-parameter budget")
    p.add_argument("--budget", type=_positive(float), default=7e9,
                   help="activated parameters per token (default 7e9)")
    p.add_argument("--precision", choices=["full", "1.58"], default="full", help="weight precision of the law")
    p.add_argument("--printed-constants", action="store_true",
                   help="use the paper's rounded constants as printed (S* = 50.2%% instead of 45.58%%)")
    p.add_argument("--plot", help="write a PNG of loss vs activated parameters here")
    p.set_defaults(func=_scaling)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qsparse`` console script; returns the exit code.

    Example:
        >>> main(["scaling", "--budget", "4e9"])  # doctest: +ELLIPSIS
        law: ...
        inference-optimal sparsity S* = 45.58%
        for 4e+09 activated parameters: total 7.35e+09 parameters (1.84x), ...
        0
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse's own errors exit 2 (--help exits 0): return the code, like ours
        return stop.code if isinstance(stop.code, int) else 2
    try:
        validate_args(args)
        return args.func(args)
    except CliError as err:
        print(f"qsparse: error: {err}", file=sys.stderr)
        return err.code


if __name__ == "__main__":
    sys.exit(main())
