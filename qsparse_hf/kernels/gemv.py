"""Sparse GEMV for decoding: ``y = x @ W.T`` reading only the weight rows of the non-zero inputs.

The weight is used input-major (``W.T`` contiguous, one row of ``out_features`` values per input feature) so that
skipping an input feature skips one contiguous row of memory. A program owns ``BLOCK_N`` output columns and a slice
of the input features (split-K); for each chunk of ``BLOCK_K`` features it loads the weight rows that at least one
of the (few) tokens needs, with a predicated load that issues no memory traffic for the others. Partial sums are
fp32; with split-K the last split to finish a column block adds the partials (in a fixed order) and the bias in the
same launch. Rows of the weight may be padded (``stride_w > out_features``): q/k/v or gate/up stored side by side
are served by one launch over the whole block, or by one launch per member over its columns.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import MAX_DECODE_TOKENS, tuning
from .launch import (KernelLaunch, _dependent_launch_start, _scratch, _semaphores, pdl_constants, pdl_enabled,
                     reserve_scratch, reserve_tickets)
from .topk import _INF_KEY, HINT_RADIUS, _magnitude_key, _row_threshold, _silu

__all__ = ["GemvConfig", "sparse_gemv", "select_gemv", "masked_gemv", "repeat_launch", "split_partials_gemv",
           "choose_config", "prepare_weight", "MAX_SELECT_FEATURES"]


@triton.jit
def _count_zeros(x_ptr, index_ptr, start, tokens, n_in, n_rows, stride_x, ROWS_PER_SPLIT: tl.constexpr,
                 TOKENS_PAD: tl.constexpr, BLOCK_K: tl.constexpr, GATHER: tl.constexpr):
    """Zeros among one split's inputs: its listed features (``GATHER``) or its rows of every token."""
    counts = tl.zeros([TOKENS_PAD, BLOCK_K], dtype=tl.int32)
    toks = tl.arange(0, TOKENS_PAD)
    for k0 in tl.range(0, ROWS_PER_SPLIT, BLOCK_K):
        slots = start + k0 + tl.arange(0, BLOCK_K)
        if GATHER:
            ok = slots[None, :] < n_rows
            rows = tl.load(index_ptr + slots[None, :], mask=ok, other=0)
            x = tl.load(x_ptr + rows, mask=ok, other=1.0)
        else:
            ok = (toks[:, None] < tokens) & (slots[None, :] < n_in)
            x = tl.load(x_ptr + toks[:, None] * stride_x + slots[None, :], mask=ok, other=1.0)
        counts += ((x == 0) & ok).to(tl.int32)
    return tl.sum(tl.sum(counts, axis=1), axis=0)


@triton.jit
def _select_row(x_ptr, hint_ptr, n_in, k, write_hint, SELECT_BLOCK: tl.constexpr, INF_KEY: tl.constexpr,
                USE_HINT: tl.constexpr, HINT_RADIUS: tl.constexpr, HINT_STEPS: tl.constexpr):
    """The exact top-K of one token's ``|x|``, as ``(threshold key, last kept index among the ties, kept non-zeros)``:
    a feature is kept when its key is above the threshold, or equal to it at an index up to the cut (ties to the
    lowest index, exactly K kept: `topk.py`'s mask). ``write_hint``: this program stores the threshold as the next
    search's hint (other programs may read either value: any hint gives the same threshold)."""
    offs = tl.arange(0, SELECT_BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n_in, other=0.0)
    key = _magnitude_key(x, INF_KEY)  # padding reads 0.0 and sits after every real index: ties never pick it
    threshold = _row_threshold(key, k, hint_ptr, write_hint, 1, USE_HINT, HINT_RADIUS, HINT_STEPS)
    greater = key > threshold
    at_threshold = key == threshold
    ties_kept = k - tl.sum(greater.to(tl.int32), 0)
    tie_rank = tl.cumsum(at_threshold.to(tl.int32), 0)
    cut = tl.max(tl.where(at_threshold & (tie_rank <= ties_kept), offs, -1), 0)
    keep = greater | (at_threshold & (offs <= cut))
    return threshold, cut, tl.sum((keep & (x != 0)).to(tl.int32), 0)


@triton.jit
def _prefetch_l2(pointers, wanted):
    """Ask L2 for the 128-byte lines at ``pointers`` where ``wanted`` (one ``prefetch.global.L2`` each; nothing is
    read into registers, nothing waits for it)."""
    tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                              "=r,l,r", [pointers, wanted.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_likely_rows(guide_ptr, hint_ptr, wt_ptr, n_in, n_rows, stride_w, ROWS_PER_SPLIT: tl.constexpr,
                          BLOCK_N: tl.constexpr, INF_KEY: tl.constexpr, WINDOW: tl.constexpr, LINES: tl.constexpr,
                          SILU: tl.constexpr):
    """Before the launch's wait (programmatic dependent launch: the selection that lists the kept rows is still
    running, and memory idles), ask L2 for the weight rows this program is likely to read first: of the
    ``WINDOW`` features where its split's listed rows would begin were the kept features spread evenly, those
    whose key in the selection's input (``guide_ptr``, complete before the selection began) reaches the last
    token's threshold (``hint_ptr``), this program's ``BLOCK_N`` columns of each (``LINES`` lines); ``SILU``: the
    selection was of the input's SiLU (a gated FFN's activation, whose gate is the guide). A guess: it changes what
    L2 holds, never what the launch computes."""
    first = (tl.program_id(1) * ROWS_PER_SPLIT).to(tl.int64) * n_in // n_rows
    features = first + tl.arange(0, WINDOW)
    inside = features < n_in
    guide = tl.load(guide_ptr + features, mask=inside, other=0.0)
    if SILU:
        guide = _silu(guide, False)
    key = _magnitude_key(guide, INF_KEY)
    likely = inside & (key >= tl.load(hint_ptr))
    LINE: tl.constexpr = BLOCK_N // LINES
    lines = tl.program_id(0) * BLOCK_N + tl.arange(0, LINES) * LINE
    _prefetch_l2(wt_ptr + features[:, None] * stride_w + lines[None, :], likely[:, None] & (lines < stride_w)[None, :])


@triton.jit
def _sparse_gemv_kernel(
    x_ptr, wt_ptr, bias_ptr, out_ptr, part_ptr, sem_ptr, zeros_ptr, index_ptr, hint_ptr, key_ptr, state_ptr, tokens,
    n_out, n_in, n_rows, stride_x, stride_w, stride_out, k_select, ROWS_PER_SPLIT: tl.constexpr,
    TOKENS_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    NUM_STAGES: tl.constexpr, HAS_BIAS: tl.constexpr, COUNT_ZEROS: tl.constexpr, GATHER: tl.constexpr,
    SELECT: tl.constexpr, MASKED: tl.constexpr, SELECT_BLOCK: tl.constexpr, INF_KEY: tl.constexpr,
    USE_HINT: tl.constexpr, HINT_RADIUS: tl.constexpr, HINT_STEPS: tl.constexpr, PDL: tl.constexpr,
    PARTIALS_OUT: tl.constexpr = False, PREFETCH: tl.constexpr = False, PREFETCH_WINDOW: tl.constexpr = 1,
    PREFETCH_LINES: tl.constexpr = 1, PREFETCH_SILU: tl.constexpr = False,
):
    if PREFETCH:  # (`GEMV_PREFETCH`: listed rows of one token, with PDL; key_ptr is the selection's input)
        _prefetch_likely_rows(key_ptr, hint_ptr, wt_ptr, n_in, n_rows, stride_w, ROWS_PER_SPLIT, BLOCK_N, INF_KEY,
                              PREFETCH_WINDOW, PREFETCH_LINES, PREFETCH_SILU)
    _dependent_launch_start(PDL)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_out
    toks = tl.arange(0, TOKENS_PAD)
    tok_ok = toks < tokens
    start = pid_s * ROWS_PER_SPLIT  # ROWS_PER_SPLIT is a multiple of BLOCK_K: splits never overlap
    if GATHER:
        # One token with its kept features listed (ascending): the loop runs over the n_rows listed rows only, so
        # every load moves data -- no predicated-off rows holding the memory pipeline.
        tile = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        for k0 in tl.range(0, ROWS_PER_SPLIT, BLOCK_K, num_stages=NUM_STAGES):
            slots = start + k0 + tl.arange(0, BLOCK_K)
            slot_ok = slots < n_rows
            rows = tl.load(index_ptr + slots, mask=slot_ok, other=0)
            x = tl.load(x_ptr + rows, mask=slot_ok, other=0.0)
            w = tl.load(wt_ptr + rows[:, None].to(tl.int64) * stride_w + cols[None, :],
                        mask=slot_ok[:, None] & col_ok[None, :], other=0.0)
            tile += x.to(tl.float32)[:, None] * w.to(tl.float32)
        acc = tl.sum(tile, axis=0).reshape(1, BLOCK_N)
    elif TOKENS_PAD == 1:
        # One token: accumulate elementwise into a [BLOCK_K, BLOCK_N] tile and reduce once at the end, so the loop
        # body has no cross-thread reduction; x is loaded in the tile's own layout (no shuffles).
        if SELECT:
            # The top-K of the dense input, found by every program (eager decode: one launch instead of a
            # selection launch and a GEMV launch, whose host cost is what an eager step waits on).
            threshold, cut, kept_nonzero = _select_row(x_ptr, hint_ptr, n_in, k_select, (pid_n == 0) & (pid_s == 0),
                                                       SELECT_BLOCK, INF_KEY, USE_HINT, HINT_RADIUS, HINT_STEPS)
        elif MASKED:
            # The top-K was resolved by the kernel that wrote x (`ffn.gated_select`): of the keys at key_ptr, keep
            # those above the threshold key, and those at it up to the cut-off index (exactly K).
            threshold = tl.load(state_ptr)
            cut = tl.load(state_ptr + 1)
        tile = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        for k0 in tl.range(0, ROWS_PER_SPLIT, BLOCK_K, num_stages=NUM_STAGES):
            rows = start + k0 + tl.arange(0, BLOCK_K)
            row_ok = rows[:, None] < n_in
            x = tl.load(x_ptr + rows[:, None], mask=row_ok, other=0.0)
            if SELECT or MASKED:
                if MASKED:
                    key = _magnitude_key(tl.load(key_ptr + rows[:, None], mask=row_ok, other=0.0), INF_KEY)
                else:
                    key = _magnitude_key(x, INF_KEY)
                x = tl.where((key > threshold) | ((key == threshold) & (rows[:, None] <= cut)), x, 0.0)
            w = tl.load(wt_ptr + rows[:, None].to(tl.int64) * stride_w + cols[None, :],
                        mask=(x != 0) & col_ok[None, :], other=0.0)
            tile += x.to(tl.float32) * w.to(tl.float32)
        acc = tl.sum(tile, axis=0).reshape(1, BLOCK_N)
    else:
        acc = tl.zeros([TOKENS_PAD, BLOCK_N], dtype=tl.float32)
        for k0 in tl.range(0, ROWS_PER_SPLIT, BLOCK_K, num_stages=NUM_STAGES):
            rows = start + k0 + tl.arange(0, BLOCK_K)
            x_ok = tok_ok[:, None] & (rows[None, :] < n_in)
            x = tl.load(x_ptr + toks[:, None] * stride_x + rows[None, :], mask=x_ok, other=0.0)
            needed = tl.max((x != 0).to(tl.int32), axis=0) > 0  # rows any token needs: the union is read
            w = tl.load(wt_ptr + rows[:, None].to(tl.int64) * stride_w + cols[None, :],
                        mask=needed[:, None] & col_ok[None, :], other=0.0)
            # bf16/fp16 values are exact in tf32, so the fp32 dot loses nothing (and Triton's CPU interpreter
            # mishandles bf16 dots).
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="tf32")
    if COUNT_ZEROS and SELECT:
        if (pid_n == 0) & (pid_s == 0):  # zeros of the sparse input, which exists only here
            tl.atomic_add(zeros_ptr, (n_in - kept_nonzero).to(tl.int64))
    elif COUNT_ZEROS:
        if pid_n == 0:
            # Every column block reads the same inputs, so one counts their zeros, in a pass of its own after its
            # products: a count inside the product loops would put a block-wide reduction in every program's loop.
            zeros = _count_zeros(x_ptr, index_ptr, start, tokens, n_in, n_rows, stride_x, ROWS_PER_SPLIT,
                                 TOKENS_PAD, BLOCK_K, GATHER)
            if GATHER:
                if pid_s == 0:  # the features not listed are zero
                    zeros += n_in - n_rows
            tl.atomic_add(zeros_ptr, zeros.to(tl.int64))
    out_mask = tok_ok[:, None] & col_ok[None, :]
    out_ptrs = out_ptr + toks[:, None] * stride_out + cols[None, :]
    if PARTIALS_OUT:  # (`split_partials_gemv`) each split's partial is the output, [splits, tokens, n_out]
        out_ptrs += pid_s * tokens * stride_out
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Split-K in one launch: every split writes its fp32 partial, and the last split of this column block to
        # arrive (an atomic ticket) adds all partials in split order -- the same order whichever program is last,
        # so the result is deterministic -- then re-arms the ticket for the next launch.
        part = part_ptr + toks[:, None] * n_out + cols[None, :]
        tl.store(part + pid_s * tokens * n_out, acc, mask=out_mask)
        tl.debug_barrier()
        ticket = tl.atomic_add(sem_ptr + pid_n, 1, sem="acq_rel")
        if ticket == SPLIT - 1:
            total = tl.zeros([TOKENS_PAD, BLOCK_N], dtype=tl.float32)
            for s in tl.static_range(SPLIT):
                total += tl.load(part + s * tokens * n_out, mask=out_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(sem_ptr + pid_n, 0)


class GemvConfig(tuple):
    """(block_n, block_k, split, num_warps, num_stages) of one sparse-GEMV launch."""

    def __new__(cls, block_n: int, block_k: int, split: int, num_warps: int = 4, num_stages: int = 3):
        return super().__new__(cls, (block_n, block_k, split, num_warps, num_stages))


# (block_n, block_k, num_warps). Narrow tiles (128-512-byte row segments) suit few output columns; the wide ones
# (1-4 KB of each weight row per program, deep split-K) keep long contiguous runs of memory in flight, which is what
# a scattered set of kept rows needs to stream near the memory's bandwidth. The tall ones (128-256 rows of 64-128
# bytes, 4 warps) load a split's whole share of kept rows in one step: a small product (q/k/v, o, down at keep 0.5)
# is bound by the dependent steps each program takes more than by bandwidth (on an H100, 0.7-2 µs faster than the
# tuner's earlier picks: benchmarks/README.md, nineteenth stop).
_TILES = ((64, 64, 4), (128, 32, 4), (128, 64, 8), (256, 32, 8), (64, 128, 8), (256, 64, 8),
          (512, 16, 8), (1024, 8, 8), (2048, 4, 8), (1024, 16, 16), (1024, 32, 16), (2048, 16, 16), (64, 128, 4))
_TALL_TILES = ((64, 128, 4), (32, 256, 4), (64, 256, 8))
#: Several tokens go through ``tl.dot``, which needs row blocks of at least this many rows.
_MIN_DOT_BLOCK_K = 16
_SPLITS = (1, 2, 4, 8, 16, 32, 64)
#: Shallower software pipelines, also timed for 4-warp tiles of 128+ rows that take several steps: without the
#: shared-memory stages more programs stay resident. On an H100 (keep 0.5, benchmarks/README.md, twenty-first
#: stop) depth 1 took down_proj 28.8 → 27.7 µs (Qwen2-7B) and 25.3 → 24.1 (Mistral-7B), depth 2 Mistral's q/k/v
#: 13.3 → 12.7; the long loops of gate/up's narrow tiles keep depth 3.
_SHALLOW_STAGES = (1, 2)


def _candidates(n_out: int, n_in: int, tokens: int = 1, tall: bool = True) -> list[GemvConfig]:
    """Launches worth timing: a few waves of programs over the SMs, at least two row blocks per split, and split-K
    partials that stay small next to the weight bytes read (4-warp tiles of 128+ rows also with shallower
    pipelines); and (``tall``) the tall tiles where a split's rows fill one row block at least half (one step per
    program), up to sixteen waves, also with the fewest splits that do (rows per split just under the block).

    Example:
        >>> GemvConfig(64, 128, 14, 4, 3) in _candidates(3584, 1792)  # 14 splits of 128 rows
        True
    """
    found = []
    # (the two conditions are disjoint: a tile in both lists never yields the same launch twice)
    for one_step, tiles in ((False, _TILES), (True, _TALL_TILES))[:2 if tall else 1]:
        for block_n, block_k, num_warps in tiles:
            if tokens > 1 and block_k < _MIN_DOT_BLOCK_K:
                continue
            # one step: a split count that need not be a power of two fills the row block (Qwen2-7B's q/k/v on an
            # H100: 14 or 15 splits of 128 rows 10.2 µs, 16 splits of 112 rows 10.5)
            splits = sorted({*_SPLITS, _cdiv(n_in, block_k)}) if one_step else _SPLITS
            for split in splits:
                programs = _cdiv(n_out, block_n) * split
                rows = n_in // split
                fits = (programs <= 2112 and block_k // 2 <= rows <= block_k) if one_step else (
                    programs <= 1056 and rows >= 2 * block_k)
                if 132 <= programs and fits and split * 16 <= n_in:
                    found.append(GemvConfig(block_n, block_k, split, num_warps, 3))
                    if not one_step and num_warps == 4 and block_k >= 128:
                        found += [GemvConfig(block_n, block_k, split, num_warps, s) for s in _SHALLOW_STAGES]
    return found or [_default_config(n_out, n_in)]


_CHOSEN: dict[tuple, GemvConfig] = {}


def _default_config(n_out: int, n_in: int) -> GemvConfig:
    # Enough programs to cover 132 SMs a few times over, with 128-byte weight segments.
    block_n = 64
    split = 1
    while _cdiv(n_out, block_n) * split < 256 and n_in // (split * 2) >= 512:
        split *= 2
    return GemvConfig(block_n, 64, split)


def choose_config(x: torch.Tensor, weight_t: torch.Tensor, tune: bool = True, rows: int | None = None,
                  tall: bool = True) -> GemvConfig:
    """Launch configuration for a shape, timed once per (shape, dtype, tokens, listed rows) on the GPU and cached.

    ``rows``: the number of kept features when the GEMV gathers listed rows (``kept`` of `sparse_gemv`), else None.
    ``tall``: the tall tiles may be chosen; `select_gemv` asks without them, since each of its programs repeats the
    selection and they launch up to twice the programs (it then takes the plain pick when that is not a tall one).
    Tuning runs only on CUDA, outside graph capture and compilation; elsewhere a heuristic default is used. Picks
    are also stored on disk and read back by later processes on the same kind of GPU (`tuning`).

    Example:
        >>> choose_config(torch.zeros(1, 4096), torch.zeros(4096, 4096), tune=False)
        (64, 64, 4, 4, 3)
    """
    n_in, n_out = weight_t.shape
    key = (n_in, n_out, _tokens(x), x.dtype, rows, tall, x.device)
    if key in _CHOSEN:
        return _CHOSEN[key]
    length = n_in if rows is None else rows
    default = _default_config(n_out, length)
    if not _tunable(x, tune):
        return default

    def time() -> GemvConfig:
        candidates = _candidates(n_out, length, _tokens(x), tall)
        # Without the tall tiles, the plain pick is taken where it is among the candidates (the fastest of all)
        best = None if tall else choose_config(x, weight_t, tune, rows)
        if best not in candidates:
            sample, kept = _tuning_inputs(x, n_in, rows)
            best = _fastest(candidates, default, lambda config: _launch(sample, weight_t, None, config, kept=kept))
        return best

    # (on disk without the device: its fingerprint, `tuning`, stands for it there)
    best = _CHOSEN[key] = GemvConfig(*tuning.tuned("gemv", key[:-1], x.device, time))
    return best


def _tunable(x: torch.Tensor, tune: bool = True) -> bool:
    """Whether launches for inputs like ``x`` may be timed now: asked to, on CUDA, outside graph capture and
    compilation.

    Example:
        >>> _tunable(torch.zeros(1, 8))
        False
    """
    return tune and x.is_cuda and not torch.cuda.is_current_stream_capturing() and not torch.compiler.is_compiling()


def _tuning_inputs(x: torch.Tensor, n_in: int, rows: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What a launch for inputs like ``x`` is timed on: a representative random input (half of it zero) rather than
    the caller's values, or with ``rows``, random values and a random ascending int32 ``[1, rows]`` list of kept
    features. Returns ``(sample, kept)``.

    Example:
        >>> sample, kept = _tuning_inputs(torch.zeros(1, 8), 8, 3); tuple(kept.shape), kept.dtype
        ((1, 3), torch.int32)
    """
    sample = torch.randn_like(x)
    kept = None
    if rows is None:
        sample *= torch.rand_like(sample, dtype=torch.float32) > 0.5
    else:
        kept = torch.randperm(n_in, device=x.device)[:rows].sort().values.to(torch.int32).reshape(1, rows)
    return sample, kept


#: Launches the first timing puts within this fraction of the fastest are timed again (at most `_RUNOFF_SIZE` of
#: them, `_RUNOFF_ROUNDS` rounds in turn, median kept): near-tied launches otherwise went either way from one process
#: to the next (Qwen2-7B's down_proj at pipeline depth 1 or 3, ~0.05 ms a step apart on an H100: benchmarks/README.md,
#: thirtieth stop).
_RUNOFF_MARGIN = 0.05
_RUNOFF_SIZE = 6
_RUNOFF_ROUNDS = 3
#: After the runoff, launches within this fraction of the fastest count as tied, and the shallowest software
#: pipeline among them wins (more programs stay resident; depth 1 took down_proj 1.1 µs less in a CUDA graph on an
#: H100, twenty-first stop), then the earliest candidate.
_TIE_MARGIN = 0.01


def _time_launch(run, config) -> float | None:
    """Median GPU milliseconds of ``run(config)`` (`triton.testing.do_bench`), None when the compiler rejects it."""
    try:
        return triton.testing.do_bench(lambda: run(config), warmup=5, rep=20, return_mode="median")
    except Exception:  # a config the compiler rejects (too many registers/shared memory) is skipped
        return None


def _fastest(configs, default, run) -> tuple:
    """The launch configuration among ``configs`` for which ``run(config)`` takes the least GPU time, ``default``
    when none runs. Every candidate is timed once (median of `triton.testing.do_bench`); those within
    `_RUNOFF_MARGIN` of the fastest are timed again in turns and judged by the median of those rounds; of the ones
    then within `_TIE_MARGIN` of the fastest, the shallowest pipeline (``num_stages``, a config's last field) wins.

    Example:
        >>> _fastest(candidates, default, lambda config: _launch(sample, weight_t, None, config))  # doctest: +SKIP
    """
    first = {config: ms for config in configs if (ms := _time_launch(run, config)) is not None}
    if not first:
        return default
    fastest = min(first.values())
    finalists = sorted((c for c in first if first[c] <= fastest * (1 + _RUNOFF_MARGIN)), key=first.get)
    finalists = finalists[:_RUNOFF_SIZE]
    judged = {config: first[config] for config in finalists}
    if len(finalists) > 1:
        rounds = {config: [] for config in finalists}
        for _ in range(_RUNOFF_ROUNDS):
            for config in finalists:  # in turns, so a slow spell of the GPU is shared out
                rounds[config].append(_time_launch(run, config))
        judged = {config: sorted(times)[len(times) // 2] for config, times in rounds.items()
                  if None not in times} or judged
    fastest = min(judged.values())
    order = {config: position for position, config in enumerate(configs)}
    tied = [config for config in judged if judged[config] <= fastest * (1 + _TIE_MARGIN)]
    return min(tied, key=lambda config: (config[-1], order[config]))


def prepare_weight(weight_t: torch.Tensor, rows: int | None = None) -> None:
    """Do, outside any graph capture, what launches on ``weight_t`` need set up beforehand: tune the one-token
    launch configurations, with ``rows`` listed kept features and with a plain sparse input, and reserve the shared
    split-K tickets and partials for them, and for up to `MAX_DECODE_TOKENS` tokens at the same splits (CUDA graph
    pools must not own any of it: `launch.reserve_scratch`)."""
    n_in, n_out = weight_t.shape
    reserve_tickets(weight_t.device, _cdiv(n_out, 32))
    sample = torch.empty(1, n_in, dtype=weight_t.dtype, device=weight_t.device)
    splits = [choose_config(sample, weight_t)[2], choose_config(sample, weight_t, tall=False)[2]]  # (.., split, ..)
    if rows is not None and rows < n_in:
        splits.append(choose_config(sample, weight_t, rows=rows)[2])
    reserve_scratch(weight_t.device, max(splits) * MAX_DECODE_TOKENS * n_out)


def _cdiv(a: int, b: int) -> int:
    return -(a // -b)  # triton.cdiv is a constexpr function: microseconds per host call


#: Most listed rows a program asks L2 for before its launch's wait (`GEMV_PREFETCH`), and most prefetch
#: instructions: about the bytes memory moves while a one-token selection runs (~14 MB in 4.6 µs on an H100) over
#: a launch's few hundred programs.
PREFETCH_ROWS = 256
_PREFETCH_INSTRUCTIONS = 1024


def _prefetch_constants(dtype: torch.dtype | None, n_in: int, n_rows: int, rows_per_split: int,
                        block_n: int, silu: bool = False) -> dict:
    """A listed-rows launch's prefetch constants (`_prefetch_likely_rows`): none without ``dtype`` (the selection
    input's) or without programmatic dependent launch (then nothing runs before the selection ends); else the
    window of features scanned -- the rows a program reads first, at most `PREFETCH_ROWS`, over the kept share --
    and the 128-byte lines of each row's columns (``silu``: the selection was of the input's SiLU).

    Example:
        >>> _prefetch_constants(None, 3584, 1792, 1792, 64)
        {}
    """
    if dtype is None or not pdl_enabled():
        return {}
    lines = max(1, block_n * torch.finfo(dtype).bits // 8 // 128)
    rows = max(1, min(rows_per_split, PREFETCH_ROWS, _PREFETCH_INSTRUCTIONS // lines))
    window = 1 << (_cdiv(rows * n_in, n_rows) - 1).bit_length()
    return dict(PREFETCH=True, PREFETCH_WINDOW=window, PREFETCH_LINES=lines, PREFETCH_SILU=silu)


class _Launch:
    """One sparse-GEMV launch shape (weight layout, tokens, listed rows, config) with its grid and constants worked
    out, so that a decode step pays one dictionary lookup on top of Triton's own launch."""

    def __init__(self, tokens: int, n_in: int, n_out: int, n_rows: int, config: GemvConfig, has_bias: bool,
                 count_zeros: bool, gather: bool, select: tuple | None = None,
                 masked: torch.dtype | None = None, add_splits: bool = True,
                 prefetch: torch.dtype | None = None, prefetch_silu: bool = False) -> None:
        block_n, block_k, split, num_warps, num_stages = config
        if tokens > 1 and block_k < _MIN_DOT_BLOCK_K:
            raise ValueError(f"a sparse GEMV of {tokens} tokens needs block_k >= {_MIN_DOT_BLOCK_K}, got config "
                             f"{config}")
        self.tokens, self.n_in, self.n_out, self.n_rows = tokens, n_in, n_out, n_rows
        self.col_blocks = _cdiv(n_out, block_n)
        self.grid = (self.col_blocks, split)
        # add_splits=False (`split_partials_gemv`): the same programs, each storing its split's partial to its own
        # slice of the output, as a launch of one split would store its product
        self.split = split if add_splits else 1
        self.partial_splits = None if add_splits else split
        # select: (k, dtype, hinted): the one-token top-K runs inside this launch (`select_gemv`)
        # masked: the dtype of `masked_gemv`'s keys, None for other launches
        k_select, dtype, hinted = select or (0, masked or prefetch, False)
        self.k_select = k_select
        rows_per_split = _cdiv(_cdiv(n_rows, split), block_k) * block_k
        self.launch = KernelLaunch(_sparse_gemv_kernel, dict(
            ROWS_PER_SPLIT=rows_per_split, TOKENS_PAD=1 if tokens == 1 else 16,
            BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=self.split, NUM_STAGES=num_stages, HAS_BIAS=has_bias,
            COUNT_ZEROS=count_zeros, GATHER=gather, SELECT=select is not None, MASKED=masked is not None,
            SELECT_BLOCK=1 << max(n_in - 1, 1).bit_length(), INF_KEY=_INF_KEY.get(dtype, 0), USE_HINT=hinted,
            HINT_RADIUS=HINT_RADIUS.get(dtype, 1), HINT_STEPS=HINT_RADIUS.get(dtype, 1).bit_length(),
            num_warps=num_warps, PARTIALS_OUT=not add_splits, **pdl_constants(),
            **_prefetch_constants(prefetch, n_in, n_rows, rows_per_split, block_n, prefetch_silu),
        ))

    def __call__(self, x: torch.Tensor, stride_x: int, weight_t: torch.Tensor, bias: torch.Tensor | None,
                 zeros: torch.Tensor | None, kept: torch.Tensor | None, hint: torch.Tensor | None = None,
                 keys: torch.Tensor | None = None, state: torch.Tensor | None = None):
        """``x``: ``[..., n_in]``, its token rows ``stride_x`` elements apart; the result is ``[..., n_out]``.
        ``keys`` and ``state``: a masked launch's (`masked_gemv`); ``keys``: a prefetching launch's guide."""
        if self.partial_splits is not None:
            out = torch.empty((self.partial_splits, *x.shape[:-1], self.n_out), dtype=torch.float32, device=x.device)
        else:
            out = torch.empty((*x.shape[:-1], self.n_out), dtype=x.dtype, device=x.device)
        if self.split > 1:
            partials = _scratch(x.device, self.split * self.tokens * self.n_out)
            tickets = _semaphores(x.device, self.col_blocks)
        else:
            partials = tickets = out
        self.launch(
            self.grid,
            (x, weight_t, x if bias is None else bias, out, partials, tickets, x if zeros is None else zeros,
             x if kept is None else kept, x if hint is None else hint, x if keys is None else keys,
             x if state is None else state),
            (self.tokens, self.n_out, self.n_in, self.n_rows, stride_x, weight_t.stride(0), self.n_out,
             self.k_select),
        )
        return out


_LAUNCHES: dict[tuple, _Launch] = {}


def _find_launch(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, config: GemvConfig,
                 zeros: torch.Tensor | None = None, kept: torch.Tensor | None = None, tokens: int | None = None,
                 select: tuple | None = None, masked: torch.dtype | None = None, add_splits: bool = True,
                 prefetch: torch.dtype | None = None, prefetch_silu: bool = False) -> _Launch:
    """The launch object for these arguments (``select``: ``(k, dtype, hinted)`` of `select_gemv`'s in-launch
    top-K; ``masked``: the dtype of `masked_gemv`'s keys; ``add_splits``: False for `split_partials_gemv`;
    ``prefetch``: the dtype of the selection's input that guides a listed-rows launch's L2 prefetch, and
    ``prefetch_silu`` whether the selection was of its SiLU)."""
    n_in, n_out = weight_t.shape
    n_rows = n_in if kept is None else kept.shape[-1]
    if tokens is None:
        tokens = _tokens(x)
    key = (tokens, n_in, n_out, n_rows, config, bias is not None, zeros is not None, kept is not None, select,
           masked, add_splits, prefetch, prefetch_silu)
    launch = _LAUNCHES.get(key)
    if launch is None:
        launch = _LAUNCHES[key] = _Launch(*key)
    return launch


def _launch(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, config: GemvConfig,
            zeros: torch.Tensor | None = None, kept: torch.Tensor | None = None, tokens: int | None = None,
            select: tuple | None = None, hint: torch.Tensor | None = None, guide: torch.Tensor | None = None,
            guide_silu: bool = False):
    """``x``: ``[..., n_in]`` (``tokens`` rows) with unit stride along its rows, contiguous or 2-D (any row
    stride). ``guide`` (with ``kept`` and ``hint``): the selection's input, for the L2 prefetch (``guide_silu``:
    the selection was of its SiLU)."""
    prefetch = None if guide is None else guide.dtype
    launch = _find_launch(x, weight_t, bias, config, zeros, kept, tokens, select, prefetch=prefetch,
                          prefetch_silu=guide_silu and guide is not None)
    return launch(x, weight_t.shape[0] if x.is_contiguous() else x.stride(0), weight_t, bias, zeros, kept, hint,
                  guide)


def _tokens(x: torch.Tensor) -> int:
    """Token rows of ``[..., features]`` (all leading dimensions)."""
    return x.numel() // x.shape[-1] if x.shape[-1] else math.prod(x.shape[:-1])


def _check_weight_t(weight_t: torch.Tensor, n_in: int, name: str) -> None:
    if weight_t.stride(-1) != 1 or n_in != weight_t.shape[0]:
        raise ValueError(f"weight_t must be a row-major [in_features, out_features] tensor matching {name}")


def _check_sparse(x: torch.Tensor, weight_t: torch.Tensor, kept: torch.Tensor | None) -> int:
    """`sparse_gemv`'s argument checks; returns the number of tokens."""
    tokens = _tokens(x) if x.dim() else MAX_DECODE_TOKENS + 1
    if tokens > MAX_DECODE_TOKENS:
        raise ValueError(f"sparse_gemv takes [..., in_features] with at most {MAX_DECODE_TOKENS} tokens, got "
                         f"{tuple(x.shape)}")
    _check_weight_t(weight_t, x.shape[-1], "x")
    if kept is not None and (tokens != 1 or kept.dim() != 2 or kept.shape[0] != 1 or kept.dtype != torch.int32):
        raise ValueError(f"kept must be an int32 [1, n] list for a one-token x, got {tuple(kept.shape)} for "
                         f"x {tuple(x.shape)}")
    return tokens


def sparse_gemv(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None,
                config: GemvConfig | None = None, zeros: torch.Tensor | None = None,
                kept: torch.Tensor | None = None, guide: torch.Tensor | None = None,
                hint: torch.Tensor | None = None, guide_silu: bool = False) -> torch.Tensor:
    """``x @ weight_t + bias`` for a few tokens, reading only the rows of ``weight_t`` where some token is non-zero.

    Args:
        x: ``[..., in_features]`` with at most `MAX_DECODE_TOKENS` tokens (all leading dimensions), bf16 or fp16,
            usually top-K sparse. The result is ``[..., out_features]``.
        weight_t: ``[in_features, out_features]`` contiguous: the transposed ``nn.Linear`` weight.
        bias: optional ``[out_features]``.
        config: launch configuration; by default `choose_config` picks (and caches) one.
        zeros: optional int64 scalar tensor; the number of zeros in ``x`` is added to it in the same launch (how
            the sparsity counters measure decode steps without a kernel of their own).
        kept: optional int32 ``[1, n]`` list of the features that may be non-zero in a one-token ``x`` (ascending,
            as `topk_sparsify_rows` writes with ``indices=True``); the GEMV then reads exactly those n weight rows.
            Features not listed must be zero in ``x``.
        guide, hint: with ``kept``, the dense input that ``x`` and ``kept`` were selected from and the selection's
            threshold hint: with programmatic dependent launch each program then asks L2, before it waits for the
            selection, for the rows it is likely to read first (`_prefetch_likely_rows`; the decode path passes
            them unless ``QSPARSE_GEMV_PREFETCH=0``). The result is the same either way.
        guide_silu: the selection was of ``guide``'s SiLU (a gated FFN's gate, for down's GEMV).

    Example:
        >>> w = torch.randn(4, 256)  # doctest: +SKIP
        >>> x = torch.tensor([[0.0, 1.0, 0.0, 2.0]])  # doctest: +SKIP
        >>> torch.allclose(sparse_gemv(x, w), x @ w)  # needs CUDA or TRITON_INTERPRET=1  # doctest: +SKIP
        True
    """
    tokens = _check_sparse(x, weight_t, kept)
    if not (x.is_contiguous() or (x.dim() == 2 and x.stride(-1) == 1)):
        x = x.reshape(-1, x.shape[-1]).contiguous().reshape(x.shape)
    rows = None if kept is None else kept.shape[1]
    if guide is not None and (kept is None or hint is None or guide.shape[-1] != x.shape[-1]
                              or guide.dtype not in _INF_KEY or guide.stride(-1) != 1):
        guide = None  # (a guess that cannot be made is not made: the product is the same)
    return _launch(x, weight_t, bias, config or choose_config(x, weight_t, rows=rows), zeros, kept, tokens,
                   hint=hint, guide=guide, guide_silu=guide_silu)


def split_partials_gemv(x: torch.Tensor, weight_t: torch.Tensor, config: GemvConfig,
                        kept: torch.Tensor | None = None) -> torch.Tensor:
    """`sparse_gemv`'s launch with ``config``, its split-K partials returned instead of added: ``[split, ...,
    out_features]`` float32 (``split`` = ``config``'s), whose sum over the first dimension is the product. The
    same programs, loads and multiply-adds, without the reduction at the end of the launch (partials written, an
    atomic ticket, the last program of each column block adding them): for a consumer that adds the partials
    itself, and for measuring what that reduction costs (`bench_gemv.py`'s split-K tail column). No bias, no zero
    count.

    Example:
        >>> x, kept = topk_sparsify_rows(torch.randn(1, 512, device="cuda").half(), 256, indices=True)  # doctest: +SKIP
        >>> w = torch.randn(512, 384, device="cuda").half()  # doctest: +SKIP
        >>> parts = split_partials_gemv(x, w, GemvConfig(64, 64, 2), kept)  # doctest: +SKIP
        >>> parts.shape, torch.allclose(parts.sum(0), (x.float() @ w.float()), atol=1e-2)  # doctest: +SKIP
        (torch.Size([2, 1, 384]), True)
    """
    tokens = _check_sparse(x, weight_t, kept)
    x = x.reshape(-1, x.shape[-1]).contiguous().reshape(x.shape)
    launch = _find_launch(x, weight_t, None, GemvConfig(*config), kept=kept, tokens=tokens, add_splits=False)
    return launch(x, weight_t.shape[0], weight_t, None, None, kept)


#: Widest input whose top-K `select_gemv` finds inside the GEMV launch (every program holds the whole row).
MAX_SELECT_FEATURES = 8192


def _check_select(x: torch.Tensor, k: int, weight_t: torch.Tensor, hint: torch.Tensor | None) -> None:
    """`select_gemv`'s argument checks."""
    n_in = x.shape[-1]
    if x.dtype not in _INF_KEY or x.numel() != n_in or not 1 <= k <= n_in or n_in > MAX_SELECT_FEATURES:
        raise ValueError(f"select_gemv takes one bf16/fp16 token of at most {MAX_SELECT_FEATURES} features and "
                         f"1 <= k <= features, got {x.dtype} {tuple(x.shape)} with k={k}")
    _check_weight_t(weight_t, n_in, "x")
    if hint is not None and (hint.dtype != torch.int32 or hint.device != x.device):
        raise ValueError(f"hint must be an int32 tensor on {x.device}, got {hint.dtype} on {hint.device}")


def select_gemv(x: torch.Tensor, k: int, weight_t: torch.Tensor, bias: torch.Tensor | None = None,
                zeros: torch.Tensor | None = None, hint: torch.Tensor | None = None,
                config: GemvConfig | None = None) -> torch.Tensor:
    """``topk(x, k) @ weight_t + bias`` for one token in one launch: every program finds the exact top-K of the
    dense ``x`` itself (the same mask as `topk.topk_sparsify_rows`: ties to the lowest index, NaN ranked as
    infinity) and reads only the kept weight rows. One launch instead of two is what an eager decode step, bound
    by host time, gains; a captured or compiled step is faster with the separate selection, which runs once.

    ``x``: ``[..., in_features]`` holding one token, bf16/fp16, ``in_features <= MAX_SELECT_FEATURES``. ``zeros``
    (int64 scalar) receives the zeros of the sparse input; ``hint`` (int32, from `topk.new_hint`) is the threshold
    the search starts from, updated in place (it never changes the result).

    Example:
        >>> w = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> torch.equal(select_gemv(x, 64, w, config=GemvConfig(64, 64, 1)),
        ...             sparse_gemv(topk_sparsify_rows(x, 64), w, config=GemvConfig(64, 64, 1)))  # doctest: +SKIP
        True
    """
    _check_select(x, k, weight_t, hint)
    if not x.is_contiguous():
        x = x.contiguous()
    return _launch(x, weight_t, bias, config or choose_config(x, weight_t, tall=False), zeros, tokens=1,
                   select=(k, x.dtype, hint is not None), hint=hint)


def masked_gemv(values: torch.Tensor, keys: torch.Tensor, state: torch.Tensor, weight_t: torch.Tensor,
                bias: torch.Tensor | None = None, config: GemvConfig | None = None) -> torch.Tensor:
    """``(values * mask) @ weight_t + bias`` for one token, where the mask is a top-K that the kernel which wrote
    ``values`` and ``keys`` has already resolved (`ffn.gated_select`): ``state`` holds the int32 threshold key and
    cut-off index, and feature ``i`` is kept when the magnitude key of ``keys[i]`` is above the threshold, or equal
    to it with ``i <= cut`` -- `topk.py`'s mask, exactly K kept. Each program applies the mask to its own rows as it
    reads them, so no selection launch and no sparse tensor come between the producer and this product.

    ``values`` and ``keys``: ``[..., in_features]`` holding one token, bf16/fp16 (for a gated FFN: the activation
    times up, and the activation that the top-K ranks). Inference only; zeros are not counted.

    Example:
        >>> act, product, state = gated_select(x, kept, block, 0, 11008, 11008, 5504, hint)  # doctest: +SKIP
        >>> out = masked_gemv(product, act, state, down_weight_t)  # doctest: +SKIP
    """
    n_in = values.shape[-1]
    if (values.numel() != n_in or keys.shape != values.shape or values.dtype not in _INF_KEY
            or keys.dtype != values.dtype):
        raise ValueError(f"masked_gemv takes one bf16/fp16 token of values and keys of one shape, got "
                         f"{values.dtype} {tuple(values.shape)} and {keys.dtype} {tuple(keys.shape)}")
    if state.dtype != torch.int32 or state.numel() < 2 or state.device != values.device:
        raise ValueError(f"state must be the int32 [threshold, cut] of the top-K on {values.device}, got "
                         f"{state.dtype} {tuple(state.shape)} on {state.device}")
    _check_weight_t(weight_t, n_in, "values")
    values, keys = values.contiguous(), keys.contiguous()
    config = config or choose_config(values, weight_t)
    launch = _find_launch(values, weight_t, bias, config, tokens=1, masked=keys.dtype)
    return launch(values, n_in, weight_t, bias, None, None, keys=keys, state=state)


def repeat_launch(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None,
                  zeros: torch.Tensor | None = None, kept: torch.Tensor | None = None, k: int | None = None,
                  hint: torch.Tensor | None = None):
    """The launch that `sparse_gemv` (or with ``k``, `select_gemv`) makes for these arguments, to repeat it for
    inputs of the same shape, dtype, device and layout, skipping the argument checks and configuration lookup
    (what an eager decode step, bound by host time, cannot afford at every call). Call it as
    ``launch(x, in_features, weight_t, bias, zeros, kept, hint)`` with a contiguous ``x``; None when the call
    takes no repeatable launch (its arguments are rejected, or ``x`` is not contiguous).

    Example:
        >>> launch = repeat_launch(x, w, k=64)  # doctest: +SKIP
        >>> torch.equal(launch(x, w.shape[0], w, None, None, None, None), select_gemv(x, 64, w))  # doctest: +SKIP
        True
    """
    if not x.is_contiguous():
        return None
    try:
        if k is None:
            _check_sparse(x, weight_t, kept)
            rows = None if kept is None else kept.shape[1]
            return _find_launch(x, weight_t, bias, choose_config(x, weight_t, rows=rows), zeros, kept)
        _check_select(x, k, weight_t, hint)
        return _find_launch(x, weight_t, bias, choose_config(x, weight_t, tall=False), zeros, tokens=1,
                            select=(k, x.dtype, hint is not None))
    except ValueError:
        return None
