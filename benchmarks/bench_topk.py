"""Top-K selection for prefill and training: torch.topk, the kthvalue reference and the Triton radix-select kernel.

Rows of Mistral-7B widths (4096 and 14336 features) for a batch of 2×2048 tokens, bf16. Prints a table, writes
topk.json. All three give exactly K entries per row; the kernel's output is checked equal to the reference.
``--one-row`` times only one decode token's selection under every launch configuration (each checked against the
reference), at the widths of ``--dims``:

    python benchmarks/bench_topk.py
    python benchmarks/bench_topk.py --one-row --dims 3584,18944   # Qwen2-7B's widths
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import graph_time_us, parse_widths, print_table, write_json  # noqa: E402

from qsparse_hf.functional import keep_count, topk_mask  # noqa: E402


def _torch_topk(x, k):
    idx = x.abs().topk(k, dim=-1).indices
    return torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))


def _one_row_sweep(dims: tuple[int, ...] = (4096, 14336)) -> list[dict]:
    """One decode token: every launch (the register kernel's (digit bits, warps) and the streamed kernel's
    (chunk, warps)), listing the kept features, against the default; and hinted launches, as the model's decode
    steps run (four tokens of the same distribution in turn, so each search starts from the previous token's
    threshold): the default, the register kernel's unhinted default and the streamed kernel's launches. A hinted
    register launch whose threads hold at most `topk.HISTOGRAM_KEYS_PER_THREAD` keys (the default at 4096: 16 warps)
    counts the hint's window in one histogram, the others binary-search it."""
    from qsparse_hf.kernels.topk import (SPLIT_CANDIDATES, STREAMED_CANDIDATES, _launch_candidates, _register_launch,
                                         launch_config, new_hint, topk_sparsify_rows)

    rows, results = [], []

    def record(config: tuple, us: float, hinted: bool) -> None:  # a timed launch of the width and keep in hand
        default = config == chosen
        results.append(dict(dim=dim, keep=keep, digit_bits=config[0], num_warps=config[-1], listed_us=us,
                            default=default, **({"hinted": True} if hinted else {})))
        marks = (["←"] if default else []) + (["with hint"] if hinted else [])
        rows.append([dim, keep, *_launch_columns(config), f"{us:.1f}", " ".join(marks)])

    for dim in dims:
        for keep in (0.7, 0.5):
            k = keep_count(keep, dim)
            xs = [torch.randn(1, dim, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
            block = triton_next_power_of_2(dim)
            chosen = launch_config(block)
            reference = xs[0] * topk_mask(xs[0], k)
            for config in [*_launch_candidates(block), *STREAMED_CANDIDATES]:
                assert torch.equal(topk_sparsify_rows(xs[0], k, config=config), reference), config
                record(config, graph_time_us(lambda i: topk_sparsify_rows(xs[i % 4], k, indices=True, config=config),
                                             calls_per_graph=5), hinted=False)
            expected = [topk_sparsify_rows(x, k, indices=True) for x in xs]
            hint = new_hint("cuda", 1)
            # hinted: the default, the register kernel's default (where the default streams or splits), the
            # streamed kernel's other launches and the split kernel's
            chosen = launch_config(block, hinted=True)
            for config in dict.fromkeys([chosen, _register_launch(block), *STREAMED_CANDIDATES, *SPLIT_CANDIDATES]):
                for x, (out, kept) in zip(xs, expected):  # the same result from any hint
                    hinted = topk_sparsify_rows(x, k, indices=True, hint=hint, config=config)
                    assert torch.equal(hinted[0], out) and torch.equal(hinted[1], kept), config
                record(config, graph_time_us(lambda i: topk_sparsify_rows(xs[i % 4], k, indices=True, hint=hint,
                                                                          config=config), calls_per_graph=5),
                       hinted=True)
    print_table(["dim", "keep", "search (digit bits, or streamed chunk / split part)", "warps",
                 "one token, listing kept µs", "default"], rows,
                title="One-token top-K launch configurations")
    return results


def _launch_columns(config: tuple) -> list:
    """``(search, warps)`` table cells of a launch: digit bits of the register kernel, or the streamed chunk."""
    return [f"{config[0]} {config[1]}", config[2]] if len(config) == 3 else [config[0], config[1]]


def triton_next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one-row", action="store_true", help="only the one-token launch sweep")
    parser.add_argument("--dims", default="4096,14336",
                        help="comma-separated row widths of the one-token sweep (Qwen2-7B: 3584,18944)")
    args = parser.parse_args(argv)
    dims = parse_widths(args.dims)
    if dims is None:
        return 2
    if not torch.cuda.is_available():
        print("bench_topk needs a CUDA GPU; none found.", file=sys.stderr)
        return 2
    if args.one_row:
        write_json("topk_one_row.json", {"one_row_sweep": _one_row_sweep(dims)})
        return 0
    from qsparse_hf.kernels.topk import topk_sparsify_rows

    rows, results = [], []
    for tokens in (1, 4096):
        for dim in (4096, 14336):
            for keep in (0.7, 0.5):
                k = keep_count(keep, dim)
                xs = [torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
                assert torch.equal(topk_sparsify_rows(xs[0], k), xs[0] * topk_mask(xs[0], k))
                t_topk = graph_time_us(lambda i: _torch_topk(xs[i % 4], k), calls_per_graph=5)
                t_kth = graph_time_us(lambda i: xs[i % 4] * topk_mask(xs[i % 4], k), calls_per_graph=5)
                t_kernel = graph_time_us(lambda i: topk_sparsify_rows(xs[i % 4], k), calls_per_graph=5)
                t_listed = graph_time_us(lambda i: topk_sparsify_rows(xs[i % 4], k, indices=True),
                                         calls_per_graph=5)
                copy = graph_time_us(lambda i: xs[i % 4].clone(), calls_per_graph=5)
                results.append(dict(tokens=tokens, dim=dim, keep=keep, torch_topk_us=t_topk, kthvalue_us=t_kth,
                                    kernel_us=t_kernel, listed_us=t_listed, copy_us=copy))
                rows.append([tokens, dim, keep, f"{t_topk:.1f}", f"{t_kth:.1f}", f"{t_kernel:.1f}", f"{t_listed:.1f}", f"{copy:.1f}",
                             f"{t_kth / t_kernel:.1f}×"])
    print_table(["tokens", "dim", "keep", "torch.topk+scatter µs", "kthvalue reference µs", "Triton radix µs",
                 "… listing kept µs", "plain copy µs", "kernel vs reference"], rows, title=f"Top-K selection, bf16, "
                f"{torch.cuda.get_device_name()}")
    sweep = _one_row_sweep(dims)
    write_json("topk.json", {"results": results, "one_row_sweep": sweep})
    return 0


if __name__ == "__main__":
    sys.exit(main())
