"""A gated FFN's decode step in two launches: the gate/up GEMV that also computes the activation and resolves its
top-K, then down's GEMV that applies that top-K as it reads its input.

`gated_select` multiplies one token's (sparse) input by gate and up, stored side by side input-major (the decode
layout of `layers.DecodeWeights`): each program owns the same block of columns of both, so the last split-K
program of a block holds gate and up of the same features. It rounds them as the GEMV's output would be rounded,
writes SiLU(gate) and SiLU(gate) * up, and counts the SiLU's magnitude keys into a histogram of the window around
the activation's threshold hint. The last block to finish (an atomic ticket) adds the blocks' histograms, reads off
the threshold key and the index of the last tie kept (ties to the lowest index: exactly K kept, `topk.py`'s mask)
and stores both. `gemv.masked_gemv` then multiplies down by the product, each program keeping the features that
pass the threshold as it loads them. Where today a compiled step runs the gate/up GEMV, the selection's two
launches and down's GEMV over the list of kept rows, this runs two launches, and neither the gate/up output nor
the sparse activation goes through memory in between. `gated_select_listed` keeps down's GEMV as it is: the same
first launch stores up instead of the product, and the split selection's writing launch then writes the sparse
product and its kept list (three launches).

Both are exact and both are off by default (`kernels.FUSED_FFN`): on an H200 neither beats the four launches
(Qwen2-7B's FFN, one token at keep 0.5: 77.1 µs shipped, 88.3 in two launches, 78.7 in three). Down's GEMV over
the gathered kept rows is worth more than the launch its list costs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from .gemv import GemvConfig, _cdiv, _fastest, _tunable, _tuning_inputs
from .launch import (KernelLaunch, _dependent_launch_start, _scratch, _semaphores, pdl_constants,
                     reserve_scratch, reserve_tickets)
from .topk import (_INF_KEY, _PRECISE, HINT_RADIUS, _chunk_of_row, _key_window_bins, _magnitude_key, _round_like,
                   _silu, _silu_options, _split_bins, _split_parts_limit, _threshold_of_parts,
                   _topk_rows_split_write_kernel)

__all__ = ["gated_select", "gated_select_listed", "gated_config", "prepare_gated", "serves"]


@triton.jit
def _gated_products(x_ptr, index_ptr, wt_ptr, gate_cols, up_cols, col_ok, start, n_in, n_rows, stride_w,
                    ROWS_PER_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    NUM_STAGES: tl.constexpr, GATHER: tl.constexpr):
    """One split's fp32 partial products of gate and up for one token: over its listed kept rows (``GATHER``) or
    its slice of every row, reading only the rows of non-zero inputs."""
    tile_gate = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    tile_up = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, ROWS_PER_SPLIT, BLOCK_K, num_stages=NUM_STAGES):
        slots = start + k0 + tl.arange(0, BLOCK_K)
        if GATHER:
            slot_ok = slots < n_rows
            rows = tl.load(index_ptr + slots, mask=slot_ok, other=0)
        else:
            slot_ok = slots < n_in
            rows = slots
        x = tl.load(x_ptr + rows, mask=slot_ok, other=0.0)
        needed = (x != 0)[:, None] & col_ok[None, :]
        row_ptrs = wt_ptr + rows[:, None].to(tl.int64) * stride_w
        w_gate = tl.load(row_ptrs + gate_cols[None, :], mask=needed, other=0.0)
        w_up = tl.load(row_ptrs + up_cols[None, :], mask=needed, other=0.0)
        tile_gate += x.to(tl.float32)[:, None] * w_gate.to(tl.float32)
        tile_up += x.to(tl.float32)[:, None] * w_up.to(tl.float32)
    return tl.sum(tile_gate, axis=0), tl.sum(tile_up, axis=0)


@triton.jit
def _gated_select_kernel(
    x_ptr, index_ptr, wt_ptr, part_ptr, hist_ptr, sem_ptr, act_ptr, prod_ptr, state_ptr, hint_ptr, n_in, n_rows, inter,
    stride_w, gate_column, up_column, k, ROWS_PER_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, NUM_STAGES: tl.constexpr, GATHER: tl.constexpr,
    COL_BLOCKS: tl.constexpr, COL_BLOCKS_PAD: tl.constexpr, BINS: tl.constexpr, HINT_RADIUS: tl.constexpr,
    INF_KEY: tl.constexpr, LISTED: tl.constexpr, PRECISE: tl.constexpr, PDL: tl.constexpr,
):
    _dependent_launch_start(PDL)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs = tl.arange(0, BLOCK_N)
    cols = pid_n * BLOCK_N + offs  # features of the activation (columns of gate and of up)
    col_ok = cols < inter
    gate, up = _gated_products(x_ptr, index_ptr, wt_ptr, gate_column + cols, up_column + cols, col_ok,
                               pid_s * ROWS_PER_SPLIT, n_in, n_rows, stride_w, ROWS_PER_SPLIT, BLOCK_N, BLOCK_K,
                               NUM_STAGES, GATHER)
    # Partials in [split, block, gate | up, BLOCK_N]. The last split of a block to arrive adds them in split
    # order (deterministic whichever is last), as `gemv.py` does.
    SPLIT_STRIDE: tl.constexpr = COL_BLOCKS * 2 * BLOCK_N
    complete = True
    if SPLIT > 1:
        block_part = part_ptr + pid_n * 2 * BLOCK_N + offs
        tl.store(block_part + pid_s * SPLIT_STRIDE, gate)
        tl.store(block_part + pid_s * SPLIT_STRIDE + BLOCK_N, up)
        tl.debug_barrier()
        ticket = tl.atomic_add(sem_ptr + pid_n, 1, sem="acq_rel")
        complete = ticket == SPLIT - 1
        if complete:
            gate = tl.zeros([BLOCK_N], dtype=tl.float32)
            up = tl.zeros([BLOCK_N], dtype=tl.float32)
            for s in tl.static_range(SPLIT):
                gate += tl.load(block_part + s * SPLIT_STRIDE, cache_modifier=".cg")
                up += tl.load(block_part + s * SPLIT_STRIDE + BLOCK_N, cache_modifier=".cg")
            tl.atomic_xchg(sem_ptr + pid_n, 0)
    if complete:
        # rounded as the GEMV would store them, then as the unfused SiLU and product round
        like = tl.zeros([BLOCK_N], dtype=act_ptr.dtype.element_ty)
        act = _silu(_round_like(gate, like, PRECISE), PRECISE)
        up_rounded = _round_like(up, like, PRECISE)
        tl.store(act_ptr + cols, act, mask=col_ok)
        if LISTED:  # up itself: the second launch multiplies the kept values, as the split selection does
            tl.store(prod_ptr + cols, up_rounded, mask=col_ok)
        else:
            product = _round_like(act.to(tl.float32) * up_rounded.to(tl.float32), act, PRECISE)
            tl.store(prod_ptr + cols, product, mask=col_ok)
        guess = tl.load(hint_ptr)
        low = tl.maximum(guess - HINT_RADIUS, 0)
        WINDOW: tl.constexpr = 2 * HINT_RADIUS
        bins = _key_window_bins(_magnitude_key(act, INF_KEY), low, guess + HINT_RADIUS - 1, WINDOW)
        tl.store(hist_ptr + pid_n * BINS + tl.arange(0, BINS), tl.histogram(bins, BINS, mask=col_ok))
        tl.debug_barrier()
        arrived = tl.atomic_add(sem_ptr + COL_BLOCKS, 1, sem="acq_rel")
        if arrived == COL_BLOCKS - 1:
            # The last block: the threshold from every block's histogram (or a search over the written
            # activation where the hint missed), then the index of the last tie kept.
            threshold, block_greater, block_ties = _threshold_of_parts(
                hist_ptr, act_ptr, inter, k, low, INF_KEY, BLOCK_N, COL_BLOCKS, COL_BLOCKS_PAD, BINS, WINDOW,
                False, PRECISE)
            tl.store(hint_ptr, threshold)
            ties_kept = k - tl.sum(block_greater, 0)  # >= 1: fewer than k keys lie above the k-th largest
            blocks = tl.arange(0, COL_BLOCKS_PAD)
            ties_before = tl.cumsum(block_ties, 0) - block_ties
            if LISTED:
                # what `topk._topk_rows_split_write_kernel` reads for each block (as a part of the row), over its
                # histogram: threshold, ties kept, strictly greater keys and ties in the blocks before it
                records = hist_ptr + blocks * BINS
                listed_block = blocks < COL_BLOCKS
                tl.store(records, tl.zeros([COL_BLOCKS_PAD], dtype=tl.int32) + threshold, mask=listed_block)
                tl.store(records + 1, tl.zeros([COL_BLOCKS_PAD], dtype=tl.int32) + ties_kept, mask=listed_block)
                tl.store(records + 2, tl.cumsum(block_greater, 0) - block_greater, mask=listed_block)
                tl.store(records + 3, ties_before, mask=listed_block)
            else:
                holding = (ties_before < ties_kept) & (ties_before + block_ties >= ties_kept) & (blocks < COL_BLOCKS)
                block = tl.maximum(tl.max(tl.where(holding, blocks, -1), 0), 0)  # (one block always holds it)
                rank = ties_kept - tl.sum(tl.where(blocks == block, ties_before, 0), 0)
                _, key, valid, features = _chunk_of_row(act_ptr, inter, block, INF_KEY, BLOCK_N)
                tie = (key == threshold) & valid
                cut = tl.max(tl.where(tie & (tl.cumsum(tie.to(tl.int32), 0) == rank), features, -1), 0)
                tl.store(state_ptr, threshold)
                tl.store(state_ptr + 1, cut)
            tl.atomic_xchg(sem_ptr + COL_BLOCKS, 0)


def serves(x: torch.Tensor, inter: int) -> bool:
    """Whether `gated_select` takes one token ``x`` (its dtype) and an activation ``inter`` features wide: bf16 (a
    block of at most `MAX_BLOCK_N` columns per program, and the last one holds every block's histogram, so at most
    ``64 * MAX_BLOCK_N`` features; fp16's wider key window allows too few blocks).

    Example:
        >>> serves(torch.zeros(1, 4096, dtype=torch.bfloat16), 14336), serves(torch.zeros(1, 8), 8)
        (True, False)
    """
    return (x.dtype == torch.bfloat16 and x.numel() == x.shape[-1]
            and _cdiv(inter, MAX_BLOCK_N) <= _split_parts_limit(x.dtype))


#: Widest block of activation features one program owns (of gate and of up each).
MAX_BLOCK_N = 1024
_CONFIGS: dict[tuple, GemvConfig] = {}


def _config_candidates(inter: int, rows: int, dtype: torch.dtype) -> list[GemvConfig]:
    """Launches worth timing: at most `_split_parts_limit` blocks of features, a few waves of programs over the
    SMs, at least two row steps per split, at most 64 weights of gate and up per thread and step, 4 or 8 warps,
    and 8 for 1024-feature blocks. Compiled for sm_90 (``kernel_registers.py --ffn``) the others spill registers:
    256/32 with 4 warps 328 bytes a thread, 1024/4 with 4 warps 16-24, every 16-warp launch tried but one 48-304
    (Triton caps them at 128 registers)."""
    found = []
    for block_n in (128, 256, 512, 1024):
        if _cdiv(inter, block_n) > _split_parts_limit(dtype):
            continue
        for block_k in (4, 8, 16, 32):
            for num_warps in (4, 8):
                if 2 * block_n * block_k > 64 * 32 * num_warps or num_warps < block_n // 128:
                    continue
                for split in (1, 2, 4, 8, 16, 32, 64):
                    programs = _cdiv(inter, block_n) * split
                    if 132 <= programs <= 1056 and rows // split >= 2 * block_k:
                        found.append(GemvConfig(block_n, block_k, split, num_warps, 3))
    return found


def _default_config(inter: int, rows: int, dtype: torch.dtype) -> GemvConfig:
    # the narrowest blocks the histogram limit allows (more programs), about two waves of 132 SMs
    block_n = 128
    while _cdiv(inter, block_n) > _split_parts_limit(dtype) and block_n < MAX_BLOCK_N:
        block_n *= 2
    split = 1
    while _cdiv(inter, block_n) * split < 264 and rows // (2 * split) >= 64:
        split *= 2
    return GemvConfig(block_n, 8, split, 4 if block_n <= 256 else 8, 3)


def gated_config(x: torch.Tensor, weight_t: torch.Tensor, inter: int, rows: int | None = None,
                 tune: bool = True) -> GemvConfig:
    """`gated_select`'s launch ``(block_n, block_k, split, num_warps, num_stages)`` for a token like ``x``, the
    gate/up block ``weight_t`` and ``rows`` kept inputs (None: every input), timed once per shape on the GPU
    (outside graph capture and compilation) and cached, in this process and on disk (`tuning`); elsewhere a
    default.

    Example:
        >>> gated_config(torch.zeros(1, 4096, dtype=torch.bfloat16), torch.zeros(4096, 28672), 14336, tune=False)
        (256, 8, 8, 4, 3)
    """
    n_in = weight_t.shape[0]
    length = n_in if rows is None else rows
    key = (n_in, weight_t.shape[1], inter, length, rows is None, x.dtype, x.device)
    if key in _CONFIGS:
        return _CONFIGS[key]
    default = _default_config(inter, length, x.dtype)
    if not _tunable(x, tune):
        return default

    def time() -> GemvConfig:
        sample, kept = _tuning_inputs(x, n_in, rows)
        hint = torch.zeros(1, dtype=torch.int32, device=x.device)
        return _fastest(_config_candidates(inter, length, x.dtype), default,
                        lambda config: _launch(sample, kept, weight_t, 0, inter, inter, max(1, inter // 2), hint,
                                               config))

    # (on disk without the device: its fingerprint, `tuning`, stands for it there)
    best = _CONFIGS[key] = GemvConfig(*tuning.tuned("gated", key[:-1], x.device, time))
    return best


def prepare_gated(weight_t: torch.Tensor, inter: int, rows: int | None = None) -> None:
    """Do, outside any graph capture, what a first `gated_select` over the gate/up block ``weight_t`` (gate in its
    first ``inter`` columns, up in the next) would otherwise do inside one: tune its launch for ``rows`` kept
    inputs, and reserve the shared tickets and scratch buffer that launch takes (`launch.reserve_scratch`).

    Example:
        >>> prepare_gated(gate_up_block, 14336, rows=2048)  # doctest: +SKIP
    """
    sample = torch.empty(1, weight_t.shape[0], dtype=weight_t.dtype, device=weight_t.device)
    if not serves(sample, inter):
        return
    if rows is not None and rows >= weight_t.shape[0]:
        rows = None  # every input kept: the selection is skipped and no list is passed
    n_in = weight_t.shape[0]
    launch = _gated_launch(n_in, n_in if rows is None else rows, inter, gated_config(sample, weight_t, inter, rows),
                           rows is not None, weight_t.dtype, False)
    reserve_tickets(weight_t.device, launch.blocks + 1)
    reserve_scratch(weight_t.device, launch.scratch)


class _GatedLaunch:
    """One `gated_select` launch shape (input rows, activation width, config, listed or not) with its constants and
    buffers' sizes worked out; with ``listed`` also the second launch, which writes the sparse activation times up
    and the list of its kept features (`topk._topk_rows_split_write_kernel`, the blocks as the row's parts)."""

    def __init__(self, n_in: int, n_rows: int, inter: int, config: GemvConfig, gather: bool, dtype: torch.dtype,
                 listed: bool) -> None:
        block_n, block_k, split, num_warps, num_stages = config
        self.blocks = _cdiv(inter, block_n)
        if self.blocks > _split_parts_limit(dtype):
            raise ValueError(f"{self.blocks} blocks of {block_n} features: the histogram limit is "
                             f"{_split_parts_limit(dtype)} (use wider blocks)")
        self.split, self.partials, self.bins = split, split * self.blocks * 2 * block_n, _split_bins(dtype)
        self.scratch = self.partials + self.blocks * self.bins  # fp32 partials, then the histograms (int32)
        self.launch = KernelLaunch(_gated_select_kernel, dict(
            ROWS_PER_SPLIT=_cdiv(_cdiv(n_rows, split), block_k) * block_k, BLOCK_N=block_n, BLOCK_K=block_k,
            SPLIT=split, NUM_STAGES=num_stages, GATHER=gather, COL_BLOCKS=self.blocks,
            COL_BLOCKS_PAD=1 << max(self.blocks - 1, 1).bit_length(), BINS=self.bins,
            HINT_RADIUS=HINT_RADIUS[dtype], INF_KEY=_INF_KEY[dtype], LISTED=listed, PRECISE=_PRECISE,
            num_warps=num_warps, **pdl_constants(), **_silu_options(True)))
        self.write = None
        if listed:
            self.write = KernelLaunch(_topk_rows_split_write_kernel, dict(
                INF_KEY=_INF_KEY[dtype], PART=block_n, PARTS=self.blocks, BINS=self.bins, COUNT_ZEROS=False,
                WRITE_INDICES=True, SILU=False, MULTIPLY=True, PRECISE=_PRECISE, num_warps=4, **pdl_constants()))

    def __call__(self, x, kept, weight_t, gate_column: int, up_column: int, inter: int, k: int, hint):
        n_in = weight_t.shape[0]
        scratch = _scratch(x.device, self.scratch)
        histograms = scratch[self.partials:].view(torch.int32)
        act = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
        second = torch.empty_like(act)  # the product, or (listed) up
        state = torch.empty(2, dtype=torch.int32, device=x.device)
        self.launch((self.blocks, self.split),
                    (x, x if kept is None else kept, weight_t, scratch, histograms,
                     _semaphores(x.device, self.blocks + 1), act, second, state, hint),
                    (n_in, n_in if kept is None else kept.shape[-1], inter, weight_t.stride(0), gate_column,
                     up_column, k))
        if self.write is None:
            return act, second, state
        sparse = torch.empty_like(act)
        listed = torch.empty(1, k, dtype=torch.int32, device=x.device)
        self.write((1, self.blocks), (act, second, sparse, sparse, listed, histograms), (inter, k, inter, inter, inter))
        return sparse, listed


_LAUNCHES: dict[tuple, _GatedLaunch] = {}


def _launch(x: torch.Tensor, kept: torch.Tensor | None, weight_t: torch.Tensor, gate_column: int, up_column: int,
            inter: int, k: int, hint: torch.Tensor, config: GemvConfig, listed: bool = False):
    n_in = weight_t.shape[0]
    launch = _gated_launch(n_in, n_in if kept is None else kept.shape[-1], inter, config, kept is not None, x.dtype,
                           listed)
    return launch(x, kept, weight_t, gate_column, up_column, inter, k, hint)


def _gated_launch(*key) -> _GatedLaunch:
    """The launch object of ``(n_in, n_rows, inter, config, gather, dtype, listed)``, made once."""
    launch = _LAUNCHES.get(key)
    if launch is None:
        launch = _LAUNCHES[key] = _GatedLaunch(*key)
    return launch


def _checked(x: torch.Tensor, kept: torch.Tensor | None, weight_t: torch.Tensor, gate_column: int, up_column: int,
             inter: int, k: int, hint: torch.Tensor | None, config: GemvConfig | None, listed: bool):
    """`gated_select`'s argument checks, then the launch."""
    if not serves(x, inter) or not 1 <= k <= inter:
        raise ValueError(f"gated_select takes one bf16 token, an activation of at most "
                         f"{_split_parts_limit(torch.bfloat16) * MAX_BLOCK_N} features and 1 <= k <= features, got "
                         f"{x.dtype} {tuple(x.shape)}, {inter} features, k={k}")
    n_in = x.shape[-1]
    if (weight_t.stride(-1) != 1 or weight_t.shape[0] != n_in
            or max(gate_column, up_column) + inter > weight_t.shape[1] or min(gate_column, up_column) < 0):
        raise ValueError(f"weight_t must be a row-major [in_features, width] block holding gate and up "
                         f"({inter} columns from {gate_column} and {up_column}), got {tuple(weight_t.shape)}")
    if kept is not None and (kept.dtype != torch.int32 or kept.dim() != 2 or kept.shape[0] != 1):
        raise ValueError(f"kept must be an int32 [1, n] list, got {kept.dtype} {tuple(kept.shape)}")
    if hint is None:
        hint = torch.zeros(1, dtype=torch.int32, device=x.device)
    rows = None if kept is None else kept.shape[-1]
    return _launch(x.contiguous(), kept, weight_t, gate_column, up_column, inter, k, hint,
                   config or gated_config(x, weight_t, inter, rows), listed)


def gated_select(x: torch.Tensor, kept: torch.Tensor | None, weight_t: torch.Tensor, gate_column: int,
                 up_column: int, inter: int, k: int, hint: torch.Tensor | None = None,
                 config: GemvConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A gated FFN's activation for one token and its top-K, resolved in the gate/up GEMV's launch.

    ``weight_t`` is the ``[in_features, width]`` input-major block holding gate in columns ``gate_column :
    gate_column + inter`` and up in ``up_column : up_column + inter``; ``x`` the ``[..., in_features]`` token
    (bf16, `serves`), sparse, with ``kept`` its int32 ``[1, n]`` ascending list of kept features (then only those
    weight rows are read) or None (the rows of its non-zeros). Returns ``(act, product, state)``: ``act =
    silu(x @ gate)``, ``product = act * (x @ up)``, each rounded as the unfused ops round, and the int32 ``state``
    ``[threshold key, cut-off index]`` of the top-``k`` of ``|act|`` (ties to the lowest index, NaN ranked as
    infinity), which `gemv.masked_gemv` applies to ``product``. ``hint``: the activation's int32 threshold hint
    (`topk.new_hint`), where the count starts and which it updates; any hint gives the same result.

    Example:
        >>> act, product, state = gated_select(x, kept, block, 0, 14336, 14336, 7168, hint)  # doctest: +SKIP
        >>> out = masked_gemv(product, act, state, down_weight_t)  # doctest: +SKIP
    """
    return _checked(x, kept, weight_t, gate_column, up_column, inter, k, hint, config, False)


def gated_select_listed(x: torch.Tensor, kept: torch.Tensor | None, weight_t: torch.Tensor, gate_column: int,
                        up_column: int, inter: int, k: int, hint: torch.Tensor | None = None,
                        config: GemvConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`gated_select` followed by a launch that writes what the split selection writes: ``(sparse, kept)``, the
    top-``k`` of ``silu(x @ gate)`` times ``x @ up`` (rounded as ``topk(F.silu(gate), k) * up``) and the int32
    ``[1, k]`` ascending list of its kept features, for down's GEMV over exactly those rows (`gemv.sparse_gemv`).
    Three launches for the FFN instead of four, down's product unchanged.

    Example:
        >>> sparse, kept_act = gated_select_listed(x, kept, block, 0, 14336, 14336, 7168, hint)  # doctest: +SKIP
        >>> out = sparse_gemv(sparse, down_weight_t, kept=kept_act)  # doctest: +SKIP
    """
    return _checked(x, kept, weight_t, gate_column, up_column, inter, k, hint, config, True)
