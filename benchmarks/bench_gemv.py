"""Per-shape decode GEMV: cuBLAS dense vs Q-Sparse (fused top-K select + sparse GEMV), Mistral-7B shapes.

Prints a Markdown table and writes gemv.json. Each timing is the median over CUDA-graph replays, rotating through
enough weight copies that nothing is served from L2. "sparse" includes the top-K selection; "gemv only" is the
sparse GEMV on an already sparse input. With one token both go the way the model's decode path does: the top-K
kernel starts from the last threshold (a hint), lists the kept features, and the GEMV reads exactly those rows.
"top-K inside the GEMV" is eager decode's single launch (`select_gemv`: every program selects; GPU time is spent
to save a launch's host time). GB/s counts the bytes actually touched (kept weight rows, x, y). "split-K tail" is
what the GEMV launch spends adding its splits' partials (the GEMV alone against the same programs storing their
partials unadded, `gemv.split_partials_gemv`): what a consumer that added the partials itself could save.

``--prefill`` times what a prompt of ``--tokens`` tokens (default 32) costs per decoder layer of a converted model
on the GPU instead: the dense products through the weights as the decode layout stores them (each member's weight a
view of its group's input-major block) beside the same products through ordinary row-major weights and one product
over the whole block, and the prompt's top-K selection of each group's input.

``--ffn`` times one token through a gated FFN of ``--arch`` per ``--keeps`` setting (bf16): dense cuBLAS (gate and
up as one product, SiLU times up, down), the four launches a compiled decode step runs today (the gate/up GEMV
over the kept inputs, the activation's split selection with SiLU and the product with up, down's GEMV over the
kept activations), the two of ``QSPARSE_FUSED_FFN=masked`` (`kernels.ffn.gated_select`, `gemv.masked_gemv`) and
the three of ``listed`` (`kernels.ffn.gated_select_listed`, down's GEMV over the kept list); the FFN input's own
selection is in every sparse column.

``--tuner`` checks how the GEMV tuner times its candidates against how a model runs them: for each ``--arch``
projection group and ``--keep``, every launch the tuner considers for one token's listed kept rows, timed as the
tuner times it (`triton.testing.do_bench`, L2 flushed, one launch at a time) and by CUDA-graph replay past L2 (a
decode step's conditions), and which launch each picks; with the tuner's candidates without the tall tiles too.

    python benchmarks/bench_gemv.py [--dtype bfloat16] [--tokens 1]
    python benchmarks/bench_gemv.py --prefill --arch qwen2 [--tokens 32] [--keep 0.5]
    python benchmarks/bench_gemv.py --ffn --arch qwen2 [--keeps 0.5,0.7]
    python benchmarks/bench_gemv.py --tuner --arch qwen2 [--keep 0.5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import device_name, graph_time_us, print_table, write_json  # noqa: E402
from bench_decode import CONFIGS, LAYERS  # noqa: E402

from qsparse_hf.functional import keep_count  # noqa: E402

SHAPES = {  # name: (in_features, out_features)
    "q/o 4096→4096": (4096, 4096),
    "k/v 4096→1024": (4096, 1024),
    "qkv 4096→6144": (4096, 6144),
    "up 4096→14336": (4096, 14336),
    "gate+up 4096→28672": (4096, 28672),
    "down 14336→4096": (14336, 4096),
}
KEEPS = (1.0, 0.9, 0.7, 0.5, 0.3)
L2_ESCAPE_BYTES = 256 * 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--tokens", type=int, default=None, help="tokens per call (default 1; 32 with --prefill)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of the shape names")
    parser.add_argument("--keeps", default=",".join(map(str, KEEPS)), help="comma-separated keep fractions")
    parser.add_argument("--prefill", action="store_true",
                        help="time a prompt's products and selections per layer of --arch (see above)")
    parser.add_argument("--ffn", action="store_true",
                        help="time one token through a gated FFN of --arch, four launches against two (see above)")
    parser.add_argument("--tuner", action="store_true",
                        help="time the GEMV tuner's candidates as it times them and in a graph (see above)")
    parser.add_argument("--arch", choices=list(CONFIGS), default="qwen2", help="with --prefill, --ffn or --tuner")
    parser.add_argument("--keep", type=float, default=0.5,
                        help="with --prefill: the selections' keep fraction; with --tuner: the GEMVs'")
    args = parser.parse_args(argv)
    if args.tokens is None:
        args.tokens = 32 if args.prefill else 1
    if args.prefill and not (0 < args.keep <= 1 and 8 < args.tokens):
        print("--prefill takes --keep in (0, 1] and --tokens above 8 (fewer take the decode GEMV)", file=sys.stderr)
        return 2
    if args.tuner and not 0 < args.keep < 1:
        print("--tuner takes --keep in (0, 1): the GEMVs it times gather listed kept rows", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_gemv needs a CUDA GPU; none found.", file=sys.stderr)
        return 2
    if args.prefill:
        return prefill(args)
    if args.ffn:
        return ffn(args)
    if args.tuner:
        return tuner(args)
    from qsparse_hf.kernels.gemv import (MAX_SELECT_FEATURES, choose_config, select_gemv, sparse_gemv,
                                         split_partials_gemv)
    from qsparse_hf.kernels.topk import new_hint, topk_sparsify_rows

    dtype = getattr(torch, args.dtype)
    results, rows = [], []
    for name in args.shapes.split(","):
        n_in, n_out = SHAPES[name]
        weight_bytes = n_in * n_out * 2
        copies = max(2, -(-L2_ESCAPE_BYTES // weight_bytes))
        weights = [torch.randn(n_out, n_in, device="cuda", dtype=dtype) / n_in**0.5 for _ in range(copies)]
        weights_t = [w.t().contiguous() for w in weights]
        xs = [torch.randn(args.tokens, n_in, device="cuda", dtype=dtype) for _ in range(copies)]
        dense_us = graph_time_us(lambda i: F.linear(xs[i % copies], weights[i % copies]))
        dense_gbs = (weight_bytes + 2 * args.tokens * (n_in + n_out)) / dense_us / 1e3
        for keep in [float(k) for k in args.keeps.split(",") if k]:
            k = keep_count(keep, n_in)
            gather = args.tokens == 1 and k < n_in
            selected = [topk_sparsify_rows(x, k, indices=True) for x in xs]
            sparse_xs = [x for x, _ in selected]
            kept = [rows if gather else None for _, rows in selected]
            ref = F.linear(sparse_xs[0].double(), weights[0].double())
            out = sparse_gemv(sparse_xs[0], weights_t[0], kept=kept[0])
            err = ((out.double() - ref).norm() / ref.norm()).item()
            config = choose_config(sparse_xs[0], weights_t[0], rows=k if gather else None)
            gemv_us = graph_time_us(lambda i: sparse_gemv(sparse_xs[i % copies], weights_t[i % copies], config=config,
                                                          kept=kept[i % copies]))
            tail_us = None
            if config[2] > 1:  # the launch adds split-K partials: time the same programs without that
                tail_us = gemv_us - graph_time_us(lambda i: split_partials_gemv(
                    sparse_xs[i % copies], weights_t[i % copies], config, kept=kept[i % copies]))
            if k >= n_in:  # keep 1.0: the model skips the top-K (it is the identity), so the GEMV is all there is
                full_us = gemv_us
            elif gather:
                hint = new_hint("cuda", 1)  # as in the model: each selection starts from the last threshold

                def step(i):
                    x_sparse, rows = topk_sparsify_rows(xs[i % copies], k, indices=True, hint=hint)
                    return sparse_gemv(x_sparse, weights_t[i % copies], config=config, kept=rows)

                full_us = graph_time_us(step)
            else:
                full_us = graph_time_us(lambda i: sparse_gemv(topk_sparsify_rows(xs[i % copies], k),
                                                              weights_t[i % copies], config=config))
            # The eager decode path's single launch (top-K inside every GEMV program): more GPU time, one launch less.
            select_us = None
            if gather and n_in <= MAX_SELECT_FEATURES:
                select_config, select_hint = choose_config(xs[0], weights_t[0], tall=False), new_hint("cuda", 1)
                select_us = graph_time_us(lambda i: select_gemv(xs[i % copies], k, weights_t[i % copies],
                                                                hint=select_hint, config=select_config))
            # Rows touched: the union of kept features over the tokens.
            kept_rows = int(sparse_xs[0].ne(0).any(dim=0).sum())
            touched = kept_rows * n_out * 2 + 2 * args.tokens * (n_in + n_out)
            entry = dict(shape=name, keep=keep, k=k, dense_us=dense_us, sparse_us=full_us, gemv_only_us=gemv_us,
                         speedup=dense_us / full_us, gemv_speedup=dense_us / gemv_us, dense_gbs=dense_gbs,
                         sparse_gbs=touched / gemv_us / 1e3, rel_err=err, config=list(config),
                         select_in_gemv_us=select_us, split_tail_us=tail_us)
            results.append(entry)
            rows.append([name, keep, f"{dense_us:.1f}", f"{full_us:.1f}", f"{gemv_us:.1f}",
                         "—" if select_us is None else f"{select_us:.1f}",
                         "—" if tail_us is None else f"{tail_us:.1f}",
                         f"{dense_us / full_us:.2f}×",
                         f"{dense_gbs:.0f}", f"{entry['sparse_gbs']:.0f}", f"{err:.1e}",
                         "/".join(map(str, config[:4]))])
        del weights, weights_t, xs
        torch.cuda.empty_cache()
    print_table(["shape", "keep", "dense µs", "sparse µs (top-K + GEMV)", "GEMV only µs",
                 "top-K inside the GEMV µs (eager path)", "split-K tail µs", "speedup",
                 "dense GB/s", "sparse GB/s (touched)", "rel err", "BN/BK/split/warps"], rows,
                title=f"Decode GEMV, {args.tokens} token(s), {args.dtype}, {torch.cuda.get_device_name()}")
    write_json(f"gemv_{args.dtype}_t{args.tokens}.json", {"tokens": args.tokens, "dtype": args.dtype,
                                                          "results": results})
    return 0


def projection_groups(config) -> dict[str, tuple[int, tuple[int, ...]]]:
    """The groups of a decoder layer's projections that share an input, as ``{name: (in_features, (out_features
    of each member, ...))}``: q/k/v, o, gate/up and down of ``config`` (a `CONFIGS` model's)."""
    hidden, intermediate = config.hidden_size, config.intermediate_size
    kv_width = config.num_key_value_heads * (hidden // config.num_attention_heads)
    return {"q/k/v": (hidden, (hidden, kv_width, kv_width)), "o": (hidden, (hidden,)),
            "gate/up": (hidden, (intermediate, intermediate)), "down": (intermediate, (hidden,))}


def tuner(args, device: str = "cuda") -> int:
    """``--tuner``: per projection group of ``args.arch`` (one launch over q/k/v and over gate/up, as the model runs
    them), one token with ``args.keep`` of its rows listed: every candidate launch of the GEMV tuner, µs as the tuner
    times it and in a CUDA-graph replay past L2, and the pick of each timing with and without the tall tiles."""
    import triton

    from qsparse_hf.kernels import gemv

    dtype = getattr(torch, args.dtype)
    results, rows = [], []
    for name, (n_in, widths) in projection_groups(CONFIGS[args.arch](1)).items():
        n_out = sum(widths)
        copies = max(2, -(-L2_ESCAPE_BYTES // (n_in * n_out * 2)))
        weights_t = [torch.randn(n_in, n_out, device=device, dtype=dtype) / n_in**0.5 for _ in range(copies)]
        k = keep_count(args.keep, n_in)
        x = torch.randn(1, n_in, device=device, dtype=dtype)
        kept = torch.randperm(n_in, device=device)[:k].sort().values.to(torch.int32).reshape(1, k)
        every, regular = gemv._candidates(n_out, k), gemv._candidates(n_out, k, tall=False)
        timed = {}
        for candidate in every:
            def run(i=0, candidate=candidate):
                return gemv.sparse_gemv(x, weights_t[i % copies], config=candidate, kept=kept)
            try:
                run()
            except Exception:  # a launch the compiler rejects is skipped, as the tuner skips it
                continue
            timed[candidate] = (triton.testing.do_bench(run, warmup=5, rep=20, return_mode="median") * 1000,
                                graph_time_us(run))
        picks = {label: min((c for c in cands if c in timed), key=lambda c: timed[c][0])
                 for label, cands in (("tuner", every), ("tuner without tall tiles", regular))}
        fastest = min(timed, key=lambda c: timed[c][1])
        results.append(dict(group=name, n_in=n_in, n_out=n_out, k=k, fastest_in_graph=[list(fastest), *timed[fastest]],
                            **{label: [list(c), *timed[c]] for label, c in picks.items()},
                            launches=[[list(c), *timed[c]] for c in sorted(timed, key=lambda c: timed[c][1])]))
        rows.append([name, len(timed)] + [f"{'/'.join(map(str, c[:4]))}: {timed[c][1]:.1f}"
                                          for c in (picks["tuner"], picks["tuner without tall tiles"], fastest)])
        del weights_t
    print_table(["group", "launches timed", "tuner's pick: graph µs", "without tall tiles", "fastest in the graph"],
                rows, title=f"GEMV tuner, {args.arch}, keep {args.keep}, one token, {args.dtype}, {device_name()}")
    write_json(f"gemv_tuner_{args.arch}_keep{args.keep}.json", {"arch": args.arch, "keep": args.keep,
                                                                "dtype": args.dtype, "results": results})
    return 0


def prefill(args) -> int:
    """``--prefill``: per group of projections that share an input (q/k/v, o, gate/up, down), µs of its products
    for a prompt of ``args.tokens`` tokens through row-major weights (dense), through views of the input-major block
    (the converted model's weights once stored for decode), and as one product over the block; and of the top-K of
    its input (down's: the activation's). Sums per layer and per model."""
    from qsparse_hf.kernels.topk import topk_sparsify_rows

    dtype = getattr(torch, args.dtype)
    layers = LAYERS[args.arch]
    rows, totals = [], [0.0] * 4
    for name, (n_in, widths) in projection_groups(CONFIGS[args.arch](layers)).items():
        copies = max(2, -(-L2_ESCAPE_BYTES // (n_in * sum(widths) * 2)))
        weights = [[torch.randn(w, n_in, device="cuda", dtype=dtype) / n_in**0.5 for w in widths]
                   for _ in range(copies)]
        blocks = [torch.cat([w.t() for w in members], dim=1) for members in weights]
        starts = [sum(widths[:m]) for m in range(len(widths))]
        views = [[block[:, a:a + w].t() for a, w in zip(starts, widths)] for block in blocks]
        xs = [torch.randn(args.tokens, n_in, device="cuda", dtype=dtype) for _ in range(copies)]
        k = keep_count(args.keep, n_in)
        timings = [
            graph_time_us(lambda i: [F.linear(xs[i % copies], w) for w in weights[i % copies]]),
            graph_time_us(lambda i: [F.linear(xs[i % copies], v) for v in views[i % copies]]),
            graph_time_us(lambda i: torch.mm(xs[i % copies], blocks[i % copies])),
            graph_time_us(lambda i: topk_sparsify_rows(xs[i % copies], k)) if k < n_in else 0.0,
        ]
        totals = [t + u for t, u in zip(totals, timings)]
        rows.append([name, f"{n_in}→{'+'.join(map(str, widths))}"] + [f"{t:.1f}" for t in timings])
    rows.append(["per layer", ""] + [f"{t:.1f}" for t in totals])
    rows.append([f"per model ({layers} layers), ms", ""] + [f"{t * layers / 1e3:.2f}" for t in totals])
    print_table(["group", "shape", "dense weights µs", "decode layout's views µs", "one product over the block µs",
                 f"top-K of the input, keep {args.keep} µs"], rows,
                title=f"Prefill of {args.tokens} tokens, {args.arch} 7B shapes, {args.dtype}, "
                      f"{torch.cuda.get_device_name()}")
    write_json(f"prefill_{args.arch}_{args.dtype}_t{args.tokens}.json",
               {"tokens": args.tokens, "dtype": args.dtype, "arch": args.arch, "keep": args.keep,
                "per_layer_us": dict(zip(("dense", "views", "block", "topk"), totals)), "table": rows})
    return 0


def ffn(args) -> int:
    """``--ffn``: µs of one token through a gated FFN of ``args.arch``, dense and the two sparse forms, per keep."""
    from qsparse_hf.kernels.ffn import gated_config, gated_select, gated_select_listed
    from qsparse_hf.kernels.gemv import choose_config, masked_gemv, sparse_gemv
    from qsparse_hf.kernels.topk import new_hint, silu_topk_rows, split_launch, topk_sparsify_rows

    dtype = torch.bfloat16
    config = CONFIGS[args.arch](1)
    hidden, inter = config.hidden_size, config.intermediate_size
    copies = max(2, -(-L2_ESCAPE_BYTES // (3 * hidden * inter * 2)))
    blocks = [torch.randn(hidden, 2 * inter, device="cuda", dtype=dtype) / hidden**0.5 for _ in range(copies)]
    downs = [torch.randn(inter, hidden, device="cuda", dtype=dtype) / inter**0.5 for _ in range(copies)]
    rows_major = [b.t().contiguous() for b in blocks]  # cuBLAS's [out, in] weights
    downs_major = [d.t().contiguous() for d in downs]
    xs = [torch.randn(1, hidden, device="cuda", dtype=dtype) for _ in range(copies)]

    def dense(i):
        both = F.linear(xs[i % copies], rows_major[i % copies])
        return F.linear(F.silu(both[:, :inter]) * both[:, inter:], downs_major[i % copies])

    dense_us = graph_time_us(dense)
    results, rows = [], []
    for keep in [float(k) for k in args.keeps.split(",") if k]:
        k_in, k_act = keep_count(keep, hidden), keep_count(keep, inter)
        if k_act >= inter:
            continue
        input_hint, act_hint, fused_hint, listed_hint = (new_hint("cuda", 1) for _ in range(4))
        x_sparse, kept = topk_sparsify_rows(xs[0], k_in, indices=True)
        up_config = choose_config(x_sparse, blocks[0], rows=k_in)
        down_config = choose_config(xs[0].new_empty(1, inter), downs[0], rows=k_act)
        masked_config = choose_config(xs[0].new_empty(1, inter), downs[0])
        fused_config = gated_config(x_sparse, blocks[0], inter, rows=k_in)
        split = split_launch(1 << (inter - 1).bit_length())

        def select_input(i):  # the FFN input's selection, the same in every sparse form
            return topk_sparsify_rows(xs[i % copies], k_in, indices=True, hint=input_hint)

        def four(i, hint=act_hint):
            x_sparse, kept = select_input(i)
            both = sparse_gemv(x_sparse, blocks[i % copies], config=up_config, kept=kept)
            act, act_kept = silu_topk_rows(both[:, :inter], k_act, both[:, inter:], indices=True, hint=hint,
                                           config=split)
            return sparse_gemv(act, downs[i % copies], config=down_config, kept=act_kept)

        def two(i, hint=fused_hint):
            x_sparse, kept = select_input(i)
            act, product, state = gated_select(x_sparse, kept, blocks[i % copies], 0, inter, inter, k_act, hint,
                                               config=fused_config)
            return masked_gemv(product, act, state, downs[i % copies], config=masked_config)

        def three(i, hint=listed_hint):
            x_sparse, kept = select_input(i)
            act, act_kept = gated_select_listed(x_sparse, kept, blocks[i % copies], 0, inter, inter, k_act, hint,
                                                config=fused_config)
            return sparse_gemv(act, downs[i % copies], config=down_config, kept=act_kept)

        reference = four(0, new_hint("cuda", 1)).double()
        errors = [((form(0, new_hint("cuda", 1)).double() - reference).norm() / reference.norm()).item()
                  for form in (two, three)]
        four_us, two_us, three_us = graph_time_us(four), graph_time_us(two), graph_time_us(three)
        results.append(dict(keep=keep, dense_us=dense_us, four_launches_us=four_us, two_launches_us=two_us,
                            three_launches_us=three_us, rel_diff_two=errors[0], rel_diff_three=errors[1],
                            gated_config=list(fused_config), masked_config=list(masked_config)))
        rows.append([keep, f"{dense_us:.1f}", f"{four_us:.1f}", f"{two_us:.1f}", f"{three_us:.1f}",
                     f"{dense_us / four_us:.2f}×", f"{dense_us / two_us:.2f}×", f"{dense_us / three_us:.2f}×",
                     f"{errors[0]:.1e} / {errors[1]:.1e}", "/".join(map(str, fused_config[:4])),
                     "/".join(map(str, masked_config[:4]))])
    print_table(["keep", "dense µs", "four launches µs (today)", "two launches µs (masked)",
                 "three launches µs (listed)", "four vs dense", "two vs dense", "three vs dense",
                 "rel diff two / three vs four", "gated BN/BK/split/warps", "masked down BN/BK/split/warps"], rows,
                title=f"One token through a gated FFN ({args.arch}: {hidden}→2×{inter}→{hidden}), bf16, "
                      f"{torch.cuda.get_device_name()}")
    write_json(f"ffn_{args.arch}.json", {"arch": args.arch, "hidden": hidden, "intermediate": inter,
                                         "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
