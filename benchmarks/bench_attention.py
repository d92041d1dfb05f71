"""The decode attention's launch settings side by side in a compiled step (GPU, bf16, batch 1, random weights).

Each setting is ``shipped`` or ``+``-joined switches of `SWITCHES` (``name`` for on, ``name=N`` for a number):
``prefetch`` (`kernels.ATTENTION_PREFETCH`: the launch asks L2 for its cached keys and values before its wait),
``store_last`` (the step's key and value stored after the loop over the cache), ``skip_hidden`` (blocks of
positions no query row sees read nothing), ``min_blocks=N`` (splits of at least N 64-position blocks), ``warps=N``
(warps a program), ``select_one_launch`` (`kernels.SPLIT_SELECT_ONE_LAUNCH`: the FFN activation's split selection
in one launch). For each setting the converted model's compiled decode step (reduce-overhead, Inductor's PDL on) is
recorded afresh and profiled at three positions of one static cache (near its start, its middle, near its end): the
step's span, and per decoder layer the attention's exposed time (`bench_decode.exposed_times`: what it adds to the
step's wall time, programmatic-dependent waits excluded), its kernel time and the split selection's exposed time.
Repeat ``shipped`` last to see the drift of one process. Results go to ``attention_settings.json``.

    python benchmarks/bench_attention.py --arch qwen2 --layers 4 --keep 0.5 --cache 304 \\
        --settings shipped,store_last,min_blocks=8+store_last,prefetch,select_one_launch,shipped
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import print_table, write_json  # noqa: E402
from bench_decode import CONFIGS, greedy_step, random_model, set_inductor_pdl, timed_steps  # noqa: E402

from qsparse_hf import convert_to_qsparse, kernels  # noqa: E402
from qsparse_hf.kernels import attention, prepare_for_decode  # noqa: E402

#: Each switch: the module holding it, its name there, and whether it takes a number (else it is turned on).
SWITCHES = {"prefetch": (kernels, "ATTENTION_PREFETCH", False), "store_last": (attention, "_STORE_LAST", False),
            "skip_hidden": (attention, "_SKIP_HIDDEN", False), "min_blocks": (attention, "_MIN_BLOCKS_PER_SPLIT", True),
            "warps": (attention, "_NUM_WARPS", True),
            "select_one_launch": (kernels, "SPLIT_SELECT_ONE_LAUNCH", False)}
#: Profiled steps at each position (the first is left out: the position was just moved).
STEPS = 5


def parse_settings(text: str) -> list[dict] | None:
    """The settings of a ``--settings`` value, each a dict of switch values (``shipped``: empty), or None after
    saying why on stderr.

    Example:
        >>> parse_settings("shipped,store_last+min_blocks=8")
        [{}, {'store_last': True, 'min_blocks': 8}]
    """
    settings = []
    for item in filter(None, text.split(",")):
        setting = {}
        for switch in ([] if item == "shipped" else item.split("+")):
            name, _, value = switch.partition("=")
            numeric = SWITCHES.get(name, (None, None, None))[2]
            if numeric is None or numeric != bool(value) or (numeric and not (value.isdigit() and int(value) >= 1)):
                print(f"--settings takes shipped or +-joined switches of {', '.join(SWITCHES)} (min_blocks=N and "
                      f"warps=N with N >= 1, the others without a value), got {switch!r} in {text!r}",
                      file=sys.stderr)
                return None
            setting[name] = int(value) if numeric else True
        settings.append(setting)
    if not settings:
        print("--settings names no setting", file=sys.stderr)
        return None
    return settings


def current_switches() -> dict:
    """Every switch's value now, by its `SWITCHES` name (before any setting: the shipped ones)."""
    return {name: getattr(module, attribute) for name, (module, attribute, _) in SWITCHES.items()}


def apply(setting: dict, shipped: dict) -> None:
    """Set every switch to ``setting``'s value, or to its ``shipped`` one where the setting leaves it."""
    for name, (module, attribute, _) in SWITCHES.items():
        setattr(module, attribute, setting.get(name, shipped[name]))


def profile_positions(model, prompt: torch.Tensor, cache: int) -> dict:
    """The compiled step recorded afresh and profiled at three positions of a ``cache``-position static cache:
    ``{position: {"step", "attention", "attention_kernel", "split_selection"}}`` in µs (the step's span; the rest
    per decoder layer, the best of the profiled steps for the span and their mean for the rest)."""
    from torch.profiler import ProfilerActivity, profile

    layers = model.config.num_hidden_layers
    torch._dynamo.reset()
    found = {}
    with torch.no_grad():
        step, position = greedy_step(model, prompt, cache, compiled=True)
        for _ in range(8):  # compile, warm-up and recording
            step()
        for at in (prompt.shape[1] + 8, cache // 2, cache - 24):
            position.fill_(at)
            step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(STEPS):
                    position.fill_(at)
                    step()
                torch.cuda.synchronize()
            steps = timed_steps(prof, STEPS)[1:]

            def per_layer(field: str, part: str) -> float:
                return sum(k[field] for timed in steps for k in timed if part in k["name"]) / len(steps) / layers

            found[at] = {"step": min(sum(k["exposed"] for k in timed) for timed in steps),
                         "attention": per_layer("exposed", "attention_kernel"),
                         "attention_kernel": per_layer("duration", "attention_kernel"),
                         "split_selection": per_layer("exposed", "_topk_rows_split")}
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=list(CONFIGS), default="qwen2")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--cache", type=int, default=304, help="static cache positions (bench_decode's timing "
                                                               "runs: 32 of prompt + 256 tokens + 16)")
    parser.add_argument("--settings", default="shipped,store_last,shipped")
    args = parser.parse_args(argv)
    settings = parse_settings(args.settings)
    if settings is None:
        return 2
    if not 0 < args.keep <= 1 or args.layers < 1 or args.cache < 96:
        print(f"--keep takes a fraction in (0, 1], --layers at least 1 and --cache at least 96 positions, got "
              f"{args.keep}, {args.layers}, {args.cache}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA GPU; none found.", file=sys.stderr)
        return 2
    set_inductor_pdl()
    model, prompt = random_model(args.arch, args.layers)
    convert_to_qsparse(model, topk=args.keep)
    prepare_for_decode(model)
    shipped = current_switches()
    results, rows = [], []
    try:
        for setting in settings:
            apply(setting, shipped)
            label = "+".join(f"{k}={v}" if v is not True else k for k, v in setting.items()) or "shipped"
            found = profile_positions(model, prompt, args.cache)
            results.append({"setting": label, "positions": found})
            for at, times in found.items():
                rows.append([label, at, f"{times['step']:.1f}", f"{times['attention']:.2f}",
                             f"{times['attention_kernel']:.2f}", f"{times['split_selection']:.2f}"])
                print(f"{label} at {at}: {times}", flush=True)
    finally:
        apply({}, shipped)
    print_table(["setting", "position", "step µs", "attention exposed µs/layer", "attention kernel µs/layer",
                 "split selection exposed µs/layer"], rows,
                f"{args.arch}, {args.layers} layers, keep {args.keep}, a {args.cache}-position static cache")
    write_json("attention_settings.json", {"arch": args.arch, "layers": args.layers, "keep": args.keep,
                                           "cache": args.cache, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
