"""Exact top-K of ``|x|`` per row in one pass over the row: a two-level radix select in a Triton program.

``torch.topk`` sorts and ``torch.kthvalue`` selects, but both launch several kernels and touch the row many times.
Here one program owns one row: it reads it once into registers, finds the K-th largest magnitude from the
magnitude's bit pattern (a radix select over the bits of the key, one or two bits per step, all in registers, no sorting), keeps ties at
the threshold in index order (exactly K survive, the same mask as `qsparse_hf.functional.topk_mask`) and writes the
sparse row -- and, for the decode GEMV, the K kept indices in ascending order. NaN ranks as infinity (so it is kept and propagates, as through a dense matmul). When asked, the program
also adds the zeros it wrote to an int64 counter (one atomic per row), so measuring sparsity costs no extra kernel.
Rows too wide for one program's registers (past 16384 keys they spill) are streamed through in chunks from cache
at every counting step instead (``("streamed", chunk, num_warps)`` launches, the default there; same result).
A decode token's wide row with a threshold hint is split over many programs instead (``("split", part,
num_warps)``): each counts its part into a histogram of the keys around the hint in one pass, the last to finish
resolves the threshold, and a second launch writes the parts (same result; with `kernels.SPLIT_SELECT_ONE_LAUNCH`
the programs wait for the last one and write their parts in the same launch). A narrower hinted bf16 row held 8 keys
a thread counts the keys around the hint in one histogram instead of binary-searching them (same result).

bf16 and fp16 only: their magnitudes are 15-bit patterns whose integer order is the float order.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .launch import (KernelLaunch, _dependent_launch_early, _dependent_launch_start, _dependent_launch_wait,
                     _dependents_may_launch, _scratch, _semaphores, pdl_constants)

__all__ = ["topk_sparsify_rows", "silu_topk_rows", "norm_topk_rows", "repeat_row_launch", "new_hint", "launch_config",
           "split_launch", "MAX_LISTED_FEATURES", "MAX_NORM_FEATURES", "HINT_RADIUS"]

#: Widest row whose kept features the kernel lists (``indices=True``): its scan packs two 16-bit counts.
MAX_LISTED_FEATURES = 32768
#: Widest row `norm_topk_rows` takes: one program holds it (a hidden state; wider rows spill registers).
MAX_NORM_FEATURES = 8192


@triton.jit
def _kth_largest_key(key, k, DIGIT_BITS: tl.constexpr):
    """The k-th largest of non-negative 15-bit keys, built from the top bit by bit (``DIGIT_BITS=1``: keep a bit
    when at least k keys reach the prefix with it set; fifteen block-wide reductions) or two bits at a time
    (``DIGIT_BITS=2``: of the prefixes with the next two bits 01, 10 and 11, keep the largest that k keys reach; the
    three counts travel packed in one int64, 21 bits each, so eight reductions). Each reduction is a barrier, which
    is what a one-token selection waits on; which variant wins depends on the row width (see ``launch_config``)."""
    prefix = 0
    if DIGIT_BITS == 1:
        # A loop, not unrolled: a decode token's selection is one program on one SM, whose instruction cache the
        # step's other kernels have emptied, so it waits on every instruction fetch, and an unrolled search fetches
        # each step's code anew (4440 instructions against 2720 for the kernel at 4096 keys). In a compiled
        # Qwen2-7B step the 3584-key selection took 5.1 us instead of 6.1 (alone in a graph: 4.9 either way).
        for bit in tl.range(14, -1, -1, loop_unroll_factor=1):
            candidate = prefix | (1 << bit)
            prefix = tl.where(tl.sum((key >= candidate).to(tl.int32), 0) >= k, candidate, prefix)
    else:
        for step in tl.static_range(7):
            shift = 13 - 2 * step
            one = prefix | (1 << shift)
            two = prefix | (2 << shift)
            three = prefix | (3 << shift)
            packed = ((key >= one).to(tl.int64) + ((key >= two).to(tl.int64) << 21)
                      + ((key >= three).to(tl.int64) << 42))
            counts = tl.sum(packed, 0)
            prefix = tl.where((counts >> 42) >= k, three,
                              tl.where(((counts >> 21) & 0x1FFFFF) >= k, two,
                                       tl.where((counts & 0x1FFFFF) >= k, one, prefix)))
        last = prefix | 1
        prefix = tl.where(tl.sum((key >= last).to(tl.int32), 0) >= k, last, prefix)
    return prefix


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _kth_largest_key_near(key, k, guess, DIGIT_BITS: tl.constexpr, HINT_RADIUS: tl.constexpr,
                          HINT_STEPS: tl.constexpr):
    """`_kth_largest_key`, searching first the ``2 * HINT_RADIUS`` keys around ``guess`` (the last threshold of
    this row's sparsifier: one token's K-th largest magnitude is close to the previous token's). Two counts in one
    reduction tell whether the threshold lies in that window; if so a binary search finds it in log2(window)
    reductions instead of fifteen, otherwise the full search runs. Any guess gives the same, exact threshold."""
    low = tl.maximum(guess - HINT_RADIUS, 0)
    high = guess + HINT_RADIUS - 1
    reach_low, pass_high = tl.reduce(((key >= low).to(tl.int32), (key > high).to(tl.int32)), 0, _add2)
    if (reach_low >= k) & (pass_high < k):
        # Invariant: at least k keys reach `low`, fewer than k pass `high`: the threshold is in [low, high].
        # 2 ** HINT_STEPS == 2 * HINT_RADIUS. Not unrolled: see _kth_largest_key.
        for _ in tl.range(HINT_STEPS, loop_unroll_factor=1):
            middle = (low + high + 1) >> 1
            reached = tl.sum((key >= middle).to(tl.int32), 0) >= k
            low = tl.where(reached, middle, low)
            high = tl.where(reached, high, middle - 1)
        threshold = low
    else:
        threshold = _kth_largest_key(key, k, DIGIT_BITS)
    return threshold


@triton.jit
def _kth_largest_key_histogram(key, valid, k, guess, DIGIT_BITS: tl.constexpr, HINT_RADIUS: tl.constexpr):
    """`_kth_largest_key_near` from one histogram of the keys around ``guess`` instead of a binary search: the keys
    counted per key of the window (and those above it) in one pass, the threshold read off a suffix sum. Returns
    the threshold and how many keys are strictly greater than it (``valid`` masks the padding out).

    Three barriers' worth of reductions instead of seven, but the histogram costs instructions for every key a
    thread holds, so `_RowLaunch` uses it only where a thread holds few (see `HISTOGRAM_KEYS_PER_THREAD`)."""
    WINDOW: tl.constexpr = 2 * HINT_RADIUS
    BINS: tl.constexpr = 4 * HINT_RADIUS  # the window, one bin below it (not counted) and one above, padded
    low = tl.maximum(guess - HINT_RADIUS, 0)
    bins = tl.arange(0, BINS)
    counts = tl.histogram(_key_window_bins(key, low, guess + HINT_RADIUS - 1, WINDOW), BINS, mask=valid)
    counts = tl.where(bins == WINDOW, 0, counts)
    # keys at or above each bin's key; the bin above the window reaches k when the threshold lies past it
    reaching = tl.cumsum(counts, 0, reverse=True)
    # the highest bin that k keys reach, with the keys strictly above it packed below (at most 32768 < 2 ** 16)
    packed = tl.max(tl.where(reaching >= k, (bins << 16) + reaching - counts, -1), 0)
    if (packed >= 0) & ((packed >> 16) < WINDOW):
        threshold = low + (packed >> 16)
        greater = packed & 0xFFFF
    else:
        threshold = _kth_largest_key(key, k, DIGIT_BITS)
        greater = tl.sum((key > threshold).to(tl.int32), 0)
    return threshold, greater


@triton.jit
def _magnitude_key(x, INF_KEY: tl.constexpr):
    """The magnitude bits of bf16/fp16 ``x`` (their integer order is the magnitudes' order). Every NaN pattern lies
    above infinity's: clamped to it, so NaN ranks as inf (ties by index), as in the reference."""
    return tl.minimum(x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF, INF_KEY)


@triton.jit
def _row_threshold(key, k, hint_ptr, write_hint, DIGIT_BITS: tl.constexpr, USE_HINT: tl.constexpr,
                   HINT_RADIUS: tl.constexpr, HINT_STEPS: tl.constexpr):
    """The k-th largest key of a row, searched from the hint at ``hint_ptr`` when ``USE_HINT`` (stored back there
    as the next search's hint when ``write_hint``), else from scratch."""
    if USE_HINT:
        threshold = _kth_largest_key_near(key, k, tl.load(hint_ptr), DIGIT_BITS, HINT_RADIUS, HINT_STEPS)
        if write_hint:
            tl.store(hint_ptr, threshold)
    else:
        threshold = _kth_largest_key(key, k, DIGIT_BITS)
    return threshold


@triton.jit
def _kept_at(key, threshold, k, offs, index_row_ptr, WRITE_INDICES: tl.constexpr):
    """Which keys of a row its top-``k`` keeps, given the k-th largest key ``threshold``: every greater key and the
    ties at the threshold lowest index first; with ``WRITE_INDICES`` their positions are also stored ascending at
    ``index_row_ptr``."""
    return _kept_with_ties(key, threshold, k - tl.sum((key > threshold).to(tl.int32), 0), offs, index_row_ptr,
                           WRITE_INDICES)


@triton.jit
def _kept_with_ties(key, threshold, ties_kept, offs, index_row_ptr, WRITE_INDICES: tl.constexpr):
    """`_kept_at` where the number of ties at the threshold to keep (``k`` less the greater keys) is known."""
    greater = key > threshold
    at_threshold = key == threshold
    if WRITE_INDICES:
        # One scan counts both the ties and the strictly greater keys before each position (16 bits each: rows
        # are at most MAX_LISTED_FEATURES wide here), which gives every kept entry its slot in the ascending list of
        # kept features. Unsigned: 32768 ties in the upper half reach the sign bit of an int32.
        both = tl.cumsum(greater.to(tl.uint32) + (at_threshold.to(tl.uint32) << 16), 0)
        ties_before = (both >> 16).to(tl.int32)
        keep = greater | (at_threshold & (ties_before <= ties_kept))
        slot = (both & 0xFFFF).to(tl.int32) + tl.minimum(ties_before, ties_kept) - 1
        tl.store(index_row_ptr + slot, offs, mask=keep)
    else:
        keep = greater | (at_threshold & (tl.cumsum(at_threshold.to(tl.int32), 0) <= ties_kept))
    return keep


@triton.jit
def _silu(x, PRECISE: tl.constexpr):
    """SiLU of bf16/fp16 ``x`` as PyTorch's CUDA kernel computes it: ``x / (1 + exp(-x))`` in fp32 with the accurate
    ``expf`` and an IEEE division (denormals kept), rounded to nearest even: the same bits as ``F.silu``.
    ``PRECISE`` False (Triton's interpreter, which has no libdevice and truncates on conversion to bf16): NumPy's
    ``exp`` and an explicit round to nearest even."""
    value = x.to(tl.float32)
    if PRECISE:
        result = tl.math.div_rn(value, 1.0 + libdevice.exp(-value))
    else:
        result = tl.math.div_rn(value, 1.0 + tl.exp(-value))
    return _round_like(result, x, PRECISE)


@triton.jit
def _round_like(value, like, PRECISE: tl.constexpr):
    """fp32 ``value`` rounded to nearest even in ``like``'s dtype (by hand for bf16 in the interpreter)."""
    if PRECISE or like.dtype != tl.bfloat16:
        rounded = value.to(like.dtype)
    else:
        bits = value.to(tl.int32, bitcast=True)
        bits = tl.where(value != value, bits | 0x400000, bits + 0x7FFF + ((bits >> 16) & 1))
        rounded = (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return rounded


@triton.jit
def _times_row(value, row_ptr, offs, valid, PRECISE: tl.constexpr):
    """A gated FFN's product of the sparse ``value`` with up (the row at ``row_ptr``, at ``offs``), rounded once as
    ``a * b`` is. Taken over every position, so a dropped feature gives 0 * up (-0.0 for a negative up, NaN for an
    infinite or NaN one), as the unfused product does."""
    up = tl.load(row_ptr + offs, mask=valid, other=0.0)
    return _round_like(value.to(tl.float32) * up.to(tl.float32), value, PRECISE)


@triton.jit
def _row_keep(key, valid, offs, k, hint_row_ptr, index_row_ptr, DIGIT_BITS: tl.constexpr, WRITE_INDICES: tl.constexpr,
              USE_HINT: tl.constexpr, HINT_RADIUS: tl.constexpr, HINT_STEPS: tl.constexpr,
              HINT_HISTOGRAM: tl.constexpr):
    """Which keys of a row held in registers its top-``k`` keeps (the hint at ``hint_row_ptr`` used and updated
    where given; the kept positions listed at ``index_row_ptr`` with ``WRITE_INDICES``); ``HINT_HISTOGRAM``: a
    hinted row counted in one histogram (`HISTOGRAM_KEYS_PER_THREAD`)."""
    if HINT_HISTOGRAM:
        threshold, greater = _kth_largest_key_histogram(key, valid, k, tl.load(hint_row_ptr), DIGIT_BITS, HINT_RADIUS)
        tl.store(hint_row_ptr, threshold)
        keep = _kept_with_ties(key, threshold, k - greater, offs, index_row_ptr, WRITE_INDICES)
    else:
        threshold = _row_threshold(key, k, hint_row_ptr, True, DIGIT_BITS, USE_HINT, HINT_RADIUS, HINT_STEPS)
        keep = _kept_at(key, threshold, k, offs, index_row_ptr, WRITE_INDICES)
    return keep


@triton.jit
def _topk_rows_kernel(x_ptr, y_ptr, out_ptr, zeros_ptr, index_ptr, hint_ptr, dim, k, stride_x, stride_y, stride_out,
                      INF_KEY: tl.constexpr, BLOCK: tl.constexpr, DIGIT_BITS: tl.constexpr, COUNT_ZEROS: tl.constexpr,
                      WRITE_INDICES: tl.constexpr, USE_HINT: tl.constexpr, HINT_RADIUS: tl.constexpr,
                      HINT_STEPS: tl.constexpr, SILU: tl.constexpr, MULTIPLY: tl.constexpr, PRECISE: tl.constexpr,
                      PDL: tl.constexpr, HINT_HISTOGRAM: tl.constexpr = False):
    _dependent_launch_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    valid = offs < dim
    x = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=0.0)
    if SILU:  # a gated FFN's activation, fused: the top-K of silu(x) (silu(0) == 0 keeps the padding at 0)
        x = _silu(x, PRECISE)
    key = _magnitude_key(x, INF_KEY)  # padding reads as 0.0 and sits after every real index: ties never pick it
    keep = _row_keep(key, valid, offs, k, hint_ptr + row, index_ptr + row * k, DIGIT_BITS, WRITE_INDICES, USE_HINT,
                     HINT_RADIUS, HINT_STEPS, HINT_HISTOGRAM)
    value = tl.where(keep, x, 0.0)
    if MULTIPLY:  # over the whole row: see _times_row
        value = _times_row(value, y_ptr + row * stride_y, offs, valid, PRECISE)
    tl.store(out_ptr + row * stride_out + offs, value, mask=valid)
    if COUNT_ZEROS:  # the zeros of the top-K itself (before any product)
        nonzero = tl.sum((keep & (x != 0)).to(tl.int32), 0)
        tl.atomic_add(zeros_ptr, (dim - nonzero).to(tl.int64))


@triton.jit
def _rsqrt(value, PRECISE: tl.constexpr):
    """``torch.rsqrt`` of fp32 ``value`` as CUDA computes it (``rsqrtf``; the interpreter has no libdevice)."""
    if PRECISE:
        result = libdevice.rsqrt(value)
    else:
        result = 1.0 / tl.sqrt(value)
    return result


@triton.jit
def _norm_topk_rows_kernel(delta_ptr, residual_ptr, weight_ptr, sum_ptr, normed_ptr, out_ptr, index_ptr, hint_ptr, dim,
                           k, eps, INF_KEY: tl.constexpr, BLOCK: tl.constexpr, DIGIT_BITS: tl.constexpr,
                           USE_HINT: tl.constexpr, HINT_RADIUS: tl.constexpr, HINT_STEPS: tl.constexpr,
                           RESIDUAL: tl.constexpr, PRECISE: tl.constexpr, PDL: tl.constexpr,
                           HINT_HISTOGRAM: tl.constexpr = False):
    # (`norm_topk_rows`) every rounding where the model's code rounds: the residual sum and the normed row in the
    # input's dtype, then the product with the norm's weight
    _dependent_launch_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    valid = offs < dim
    hidden = tl.load(delta_ptr + row * dim + offs, mask=valid, other=0.0)
    if RESIDUAL:
        residual = tl.load(residual_ptr + row * dim + offs, mask=valid, other=0.0)
        hidden = _round_like(hidden.to(tl.float32) + residual.to(tl.float32), hidden, PRECISE)
        tl.store(sum_ptr + row * dim + offs, hidden, mask=valid)
    value = hidden.to(tl.float32)
    variance = tl.math.div_rn(tl.sum(value * value, 0), dim.to(tl.float32))
    normed = _round_like(value * _rsqrt(variance + eps, PRECISE), hidden, PRECISE)
    weight = tl.load(weight_ptr + offs, mask=valid, other=0.0)
    x = _round_like(weight.to(tl.float32) * normed.to(tl.float32), hidden, PRECISE)
    tl.store(normed_ptr + row * dim + offs, x, mask=valid)
    # the next kernel (a GEMV that guesses its rows from the normed row) may start now
    _dependents_may_launch(PDL)
    keep = _row_keep(_magnitude_key(x, INF_KEY), valid, offs, k, hint_ptr + row, index_ptr + row * k, DIGIT_BITS,
                     True, USE_HINT, HINT_RADIUS, HINT_STEPS, HINT_HISTOGRAM)
    tl.store(out_ptr + row * dim + offs, tl.where(keep, x, 0.0), mask=valid)


@triton.jit
def _chunk_of_row(row_ptr, dim, chunk, INF_KEY: tl.constexpr, CHUNK: tl.constexpr, SILU: tl.constexpr = False,
                  PRECISE: tl.constexpr = True):
    """Chunk ``chunk`` of the row at ``row_ptr``: its values (``SILU``: their SiLU, see `_silu`), their magnitude
    keys, which of them lie inside the row, and their positions."""
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = offs < dim
    x = tl.load(row_ptr + offs, mask=valid, other=0.0)
    if SILU:  # silu(0) == 0: the padding stays 0
        x = _silu(x, PRECISE)
    return x, _magnitude_key(x, INF_KEY), valid, offs


@triton.jit
def _count_streamed(row_ptr, dim, low, high, INF_KEY: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr,
                    TWO: tl.constexpr = False, SILU: tl.constexpr = False, PRECISE: tl.constexpr = True):
    """How many keys of the row at ``row_ptr`` reach ``low`` (and, with ``TWO``, how many reach ``high``; else
    0), the row streamed in ``CHUNKS`` chunks (from cache after the first pass): one block-wide reduction, few
    registers."""
    reach_low = tl.zeros([CHUNK], dtype=tl.int32)
    reach_high = tl.zeros([CHUNK], dtype=tl.int32)
    for chunk in tl.range(0, CHUNKS, loop_unroll_factor=1):
        _, key, valid, _ = _chunk_of_row(row_ptr, dim, chunk, INF_KEY, CHUNK, SILU, PRECISE)
        reach_low += ((key >= low) & valid).to(tl.int32)
        if TWO:
            reach_high += ((key >= high) & valid).to(tl.int32)
    if TWO:
        count_low, count_high = tl.reduce((reach_low, reach_high), 0, _add2)
    else:
        count_low = tl.sum(reach_low, 0)
        count_high = 0
    return count_low, count_high


@triton.jit
def _search_streamed(row_ptr, dim, k, INF_KEY: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr,
                     SILU: tl.constexpr = False, PRECISE: tl.constexpr = True):
    """The k-th largest key of the row at ``row_ptr`` (``SILU``: of its SiLU), bit by bit from the top (fifteen
    streamed counts)."""
    prefix = 0
    for bit in tl.static_range(14, -1, -1):
        candidate = prefix | (1 << bit)
        reached = _count_streamed(row_ptr, dim, candidate, 0, INF_KEY, CHUNK, CHUNKS, False, SILU, PRECISE)[0] >= k
        prefix = tl.where(reached, candidate, prefix)
    return prefix


@triton.jit
def _write_chunk(x, key, valid, offs, out_row_ptr, kept_row_ptr, threshold, ties_kept, greater_before, ties_before,
                 WRITE_INDICES: tl.constexpr, up_row_ptr=None, MULTIPLY: tl.constexpr = False,
                 PRECISE: tl.constexpr = True):
    """Write one chunk of a sparse row (and its slots of the ascending list of kept features), given the threshold
    key, how many ties at it are kept, and the strictly greater keys and ties before the chunk; ``MULTIPLY``: the
    sparse values times the row at ``up_row_ptr`` (as `_topk_rows_kernel` does). Returns the chunk's (greater keys,
    ties, kept non-zeros)."""
    greater = (key > threshold) & valid
    at_threshold = (key == threshold) & valid
    # Each 16-bit half of the scan holds one count (chunks are at most 32768 wide); unsigned, as in _topk_rows_kernel.
    packed = greater.to(tl.uint32) + (at_threshold.to(tl.uint32) << 16)
    both = tl.cumsum(packed, 0)
    ties_up_to = (both >> 16).to(tl.int32) + ties_before
    keep = greater | (at_threshold & (ties_up_to <= ties_kept))
    if WRITE_INDICES:
        slot = (both & 0xFFFF).to(tl.int32) + greater_before + tl.minimum(ties_up_to, ties_kept) - 1
        tl.store(kept_row_ptr + slot, offs, mask=keep)
    value = tl.where(keep, x, 0.0)
    if MULTIPLY:
        value = _times_row(value, up_row_ptr, offs, valid, PRECISE)
    tl.store(out_row_ptr + offs, value, mask=valid)
    counts = tl.sum(packed, 0)
    nonzero = tl.sum((keep & (x != 0)).to(tl.int32), 0)
    return (counts & 0xFFFF).to(tl.int32), (counts >> 16).to(tl.int32), nonzero


@triton.jit
def _write_streamed(row_ptr, out_row_ptr, kept_row_ptr, zeros_ptr, dim, threshold, ties_kept, INF_KEY: tl.constexpr,
                    CHUNK: tl.constexpr, CHUNKS: tl.constexpr, COUNT_ZEROS: tl.constexpr,
                    WRITE_INDICES: tl.constexpr):
    """Write the sparse row (and its kept features' list) chunk by chunk, carrying the counts across chunks."""
    greater_before = 0
    ties_before = 0
    nonzero = 0
    for chunk in tl.range(0, CHUNKS, loop_unroll_factor=1):
        x, key, valid, offs = _chunk_of_row(row_ptr, dim, chunk, INF_KEY, CHUNK)
        greater, ties, kept_nonzero = _write_chunk(x, key, valid, offs, out_row_ptr, kept_row_ptr, threshold,
                                                   ties_kept, greater_before, ties_before, WRITE_INDICES)
        greater_before += greater
        ties_before += ties
        nonzero += kept_nonzero
    if COUNT_ZEROS:
        tl.atomic_add(zeros_ptr, (dim - nonzero).to(tl.int64))


@triton.jit
def _topk_rows_streamed_kernel(x_ptr, y_ptr, out_ptr, zeros_ptr, index_ptr, hint_ptr, dim, k, stride_x, stride_y,
                               stride_out, INF_KEY: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr,
                               COUNT_ZEROS: tl.constexpr, WRITE_INDICES: tl.constexpr, USE_HINT: tl.constexpr,
                               HINT_RADIUS: tl.constexpr, HINT_STEPS: tl.constexpr, PDL: tl.constexpr):
    """`_topk_rows_kernel` for wide rows: the same threshold search, tie rule and outputs, but each counting step
    streams the row in chunks instead of holding it in registers (a 32768-key row spills them), and nothing past
    the row's end is read or counted. It takes the same arguments (``y_ptr``, ``stride_y``: unused, no SiLU here)."""
    _dependent_launch_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    row_ptr = x_ptr + row * stride_x
    threshold = -1
    if USE_HINT:
        guess = tl.load(hint_ptr + row)
        low = tl.maximum(guess - HINT_RADIUS, 0)
        high = guess + HINT_RADIUS - 1
        reach_low, pass_high = _count_streamed(row_ptr, dim, low, high + 1, INF_KEY, CHUNK, CHUNKS, True)
        if (reach_low >= k) & (pass_high < k):  # the threshold is in [low, high]: a binary search finds it
            for _ in tl.static_range(HINT_STEPS):
                middle = (low + high + 1) >> 1
                reached = _count_streamed(row_ptr, dim, middle, 0, INF_KEY, CHUNK, CHUNKS)[0] >= k
                low = tl.where(reached, middle, low)
                high = tl.where(reached, high, middle - 1)
            threshold = low
    if threshold < 0:  # no hint, or not in its window: bit by bit from the top
        threshold = _search_streamed(row_ptr, dim, k, INF_KEY, CHUNK, CHUNKS)
    if USE_HINT:
        tl.store(hint_ptr + row, threshold)
    ties_kept = k - _count_streamed(row_ptr, dim, threshold + 1, 0, INF_KEY, CHUNK, CHUNKS)[0]
    _write_streamed(row_ptr, out_ptr + row * stride_out, index_ptr + row * k, zeros_ptr, dim, threshold, ties_kept,
                    INF_KEY, CHUNK, CHUNKS, COUNT_ZEROS, WRITE_INDICES)


@triton.jit
def _key_window_bins(key, low, high, WINDOW: tl.constexpr):
    """Histogram bins of keys around a hint: 0 .. WINDOW - 1 the keys ``low .. high``, WINDOW below them (not
    needed), WINDOW + 1 above them."""
    return tl.where(key > high, WINDOW + 1, tl.where(key >= low, key - low, WINDOW))


@triton.jit
def _threshold_of_parts(hist_ptr, row_ptr, dim, k, low, INF_KEY: tl.constexpr, PART: tl.constexpr,
                        PARTS: tl.constexpr, PARTS_PAD: tl.constexpr, BINS: tl.constexpr, WINDOW: tl.constexpr,
                        SILU: tl.constexpr, PRECISE: tl.constexpr):
    """The k-th largest key of a row counted in parts, and each part's strictly greater keys and ties at it, from
    the parts' histograms at ``hist_ptr`` (``BINS`` apiece, `_key_window_bins` of the window from ``low``). A
    threshold outside the window (a hint that missed, or none yet) is searched bit by bit over the row at
    ``row_ptr`` (``SILU``: of its SiLU), and the parts counted one by one, by the calling program alone."""
    parts = tl.arange(0, PARTS_PAD)
    bins = tl.arange(0, BINS)
    histograms = tl.load(hist_ptr + parts[:, None] * BINS + bins[None, :], mask=parts[:, None] < PARTS, other=0,
                         cache_modifier=".cg")
    total = tl.sum(histograms, 0)
    above = tl.sum(tl.where(bins == WINDOW + 1, total, 0), 0)
    window = tl.where(bins < WINDOW, total, 0)
    # keys strictly above each window key: those above the window and those in later bins
    greater = above + tl.sum(window, 0) - tl.cumsum(window, 0)
    reaching = (greater + window >= k) & (bins < WINDOW)
    found = (above < k) & (tl.max(reaching.to(tl.int32), 0) > 0)
    threshold_bin = tl.max(tl.where(reaching, bins, -1), 0)
    if found:
        threshold = low + threshold_bin
        above_threshold = ((bins > threshold_bin) & (bins < WINDOW)) | (bins == WINDOW + 1)
        part_greater = tl.sum(tl.where(above_threshold[None, :], histograms, 0), 1)
        part_ties = tl.sum(tl.where(bins[None, :] == threshold_bin, histograms, 0), 1)
    else:
        threshold = _search_streamed(row_ptr, dim, k, INF_KEY, PART, PARTS, SILU, PRECISE)
        part_greater = tl.zeros([PARTS_PAD], dtype=tl.int32)
        part_ties = tl.zeros([PARTS_PAD], dtype=tl.int32)
        for other in tl.range(0, PARTS, loop_unroll_factor=1):
            _, other_key, other_valid, _ = _chunk_of_row(row_ptr, dim, other, INF_KEY, PART, SILU, PRECISE)
            greater_here, ties_here = tl.reduce((((other_key > threshold) & other_valid).to(tl.int32),
                                                 ((other_key == threshold) & other_valid).to(tl.int32)), 0, _add2)
            part_greater = tl.where(parts == other, greater_here, part_greater)
            part_ties = tl.where(parts == other, ties_here, part_ties)
    return threshold, part_greater, part_ties


@triton.jit
def _count_part(x_ptr, hint_ptr, part_ptr, row_ticket_ptr, row, part, dim, k, stride_x, INF_KEY: tl.constexpr,
                PART: tl.constexpr, PARTS: tl.constexpr, PARTS_PAD: tl.constexpr, HINT_RADIUS: tl.constexpr,
                BINS: tl.constexpr, SILU: tl.constexpr, PRECISE: tl.constexpr):
    """One program's share of a split selection's counting (see `_topk_rows_split_count_kernel`): its part's
    histogram stored, its ticket taken (of the row's at ``row_ticket_ptr``), and the row resolved by the program
    whose ticket is the last. Returns the part's ``(values, keys, valid, positions)`` and the ticket."""
    row_ptr = x_ptr + row * stride_x
    guess = tl.load(hint_ptr + row)
    low = tl.maximum(guess - HINT_RADIUS, 0)
    high = guess + HINT_RADIUS - 1
    WINDOW: tl.constexpr = 2 * HINT_RADIUS
    x, key, valid, offs = _chunk_of_row(row_ptr, dim, part, INF_KEY, PART, SILU, PRECISE)
    bins = tl.arange(0, BINS)
    row_parts = part_ptr + row * PARTS * BINS
    tl.store(row_parts + part * BINS + bins, tl.histogram(_key_window_bins(key, low, high, WINDOW), BINS, mask=valid))
    tl.debug_barrier()
    ticket = tl.atomic_add(row_ticket_ptr, 1, sem="acq_rel")
    if ticket == PARTS - 1:
        parts = tl.arange(0, PARTS_PAD)
        threshold, part_greater, part_ties = _threshold_of_parts(row_parts, row_ptr, dim, k, low, INF_KEY, PART,
                                                                 PARTS, PARTS_PAD, BINS, WINDOW, SILU, PRECISE)
        tl.store(hint_ptr + row, threshold)
        ties_kept = k - tl.sum(part_greater, 0)
        greater_before = tl.cumsum(part_greater, 0) - part_greater
        ties_before = tl.cumsum(part_ties, 0) - part_ties
        resolved = row_parts + parts * BINS
        valid_part = parts < PARTS
        tl.store(resolved, tl.zeros([PARTS_PAD], dtype=tl.int32) + threshold, mask=valid_part)
        tl.store(resolved + 1, tl.zeros([PARTS_PAD], dtype=tl.int32) + ties_kept, mask=valid_part)
        tl.store(resolved + 2, greater_before, mask=valid_part)
        tl.store(resolved + 3, ties_before, mask=valid_part)
    return x, key, valid, offs, ticket


@triton.jit
def _split_program_start(EARLY_DEPENDENTS: tl.constexpr, PDL: tl.constexpr):
    """A writing split program's start (``EARLY_DEPENDENTS``: the next kernel let in before this one's wait, see
    `_dependent_launch_early`); returns its ``(row, part)``."""
    if EARLY_DEPENDENTS:
        _dependent_launch_early(PDL)
    else:
        _dependent_launch_start(PDL)
    return tl.program_id(0).to(tl.int64), tl.program_id(1)


@triton.jit
def _write_part(x, key, valid, offs, resolved, out_row_ptr, kept_row_ptr, up_row_ptr, zeros_ptr,
                COUNT_ZEROS: tl.constexpr, WRITE_INDICES: tl.constexpr, MULTIPLY: tl.constexpr, PRECISE: tl.constexpr):
    """Write one part of a split selection's row from what its counting resolved for it at ``resolved``
    (`_count_part`; read past L1, which another program's stores in the same launch do not reach) and add the
    zeros it wrote to ``zeros_ptr`` (``COUNT_ZEROS``)."""
    _, _, nonzero = _write_chunk(x, key, valid, offs, out_row_ptr, kept_row_ptr,
                                 tl.load(resolved, cache_modifier=".cg"), tl.load(resolved + 1, cache_modifier=".cg"),
                                 tl.load(resolved + 2, cache_modifier=".cg"),
                                 tl.load(resolved + 3, cache_modifier=".cg"), WRITE_INDICES, up_row_ptr, MULTIPLY,
                                 PRECISE)
    if COUNT_ZEROS:
        tl.atomic_add(zeros_ptr, (tl.sum(valid.to(tl.int32), 0) - nonzero).to(tl.int64))


@triton.jit
def _topk_rows_split_count_kernel(x_ptr, hint_ptr, part_ptr, ticket_ptr, dim, k, stride_x, INF_KEY: tl.constexpr,
                                  PART: tl.constexpr, PARTS: tl.constexpr, PARTS_PAD: tl.constexpr,
                                  HINT_RADIUS: tl.constexpr, BINS: tl.constexpr, SILU: tl.constexpr,
                                  PRECISE: tl.constexpr, PDL: tl.constexpr):
    """First launch of a hinted selection split over ``PARTS`` programs per row: each counts its ``PART``-key slice
    in one pass, as a histogram of the keys in the hint's window (``2 * HINT_RADIUS`` bins) with one bin for the
    keys above it. The last program of the row to finish (an atomic ticket) adds the histograms and reads off them
    the threshold and, for every part, the strictly greater keys and ties in the parts before it; where the
    threshold lies outside the window (a hint that missed, or none yet) it searches the row bit by bit and counts
    the parts itself. It stores ``[threshold, ties kept, greater before, ties before]`` of each part over the
    part's histogram, for `_topk_rows_split_write_kernel`, and the threshold as the row's next hint. ``SILU``: the
    selection is of the row's SiLU (a gated FFN's activation), computed on the way."""
    _dependent_launch_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    _, _, _, _, ticket = _count_part(x_ptr, hint_ptr, part_ptr, ticket_ptr + row, row, tl.program_id(1), dim, k,
                                     stride_x, INF_KEY, PART, PARTS, PARTS_PAD, HINT_RADIUS, BINS, SILU, PRECISE)
    if ticket == PARTS - 1:
        tl.atomic_xchg(ticket_ptr + row, 0)


@triton.jit
def _acquire_load(pointer):
    """``pointer``'s int32 as GPU-scope acquire reads it (every thread for itself: no barrier to spin on)."""
    return tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [pointer], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _topk_rows_split_kernel(x_ptr, y_ptr, out_ptr, zeros_ptr, index_ptr, hint_ptr, part_ptr, ticket_ptr, dim, k,
                            stride_x, stride_y, stride_out, INF_KEY: tl.constexpr, PART: tl.constexpr,
                            PARTS: tl.constexpr, PARTS_PAD: tl.constexpr, HINT_RADIUS: tl.constexpr,
                            BINS: tl.constexpr, COUNT_ZEROS: tl.constexpr, WRITE_INDICES: tl.constexpr,
                            SILU: tl.constexpr, MULTIPLY: tl.constexpr, PRECISE: tl.constexpr, PDL: tl.constexpr,
                            EARLY_DEPENDENTS: tl.constexpr = False):
    """A split selection in one launch: `_topk_rows_split_count_kernel`'s counting, then every program waits for
    its row's last one to resolve the threshold (a GPU-wide barrier per row) and writes its part from the values
    it still holds, as `_topk_rows_split_write_kernel` would. Only where every program of the launch is resident at
    once (`_RowLaunch`: at most one program per SM), and never in Triton's interpreter (it runs programs one
    after another). Two tickets per row at ``ticket_ptr``: arrivals (``PARTS`` once all counted, ``2 * PARTS``
    once resolved) and departures; the last waiter to leave re-arms both."""
    row, part = _split_program_start(EARLY_DEPENDENTS, PDL)
    arrivals = ticket_ptr + 2 * row
    x, key, valid, offs, ticket = _count_part(x_ptr, hint_ptr, part_ptr, arrivals, row, part, dim, k, stride_x,
                                              INF_KEY, PART, PARTS, PARTS_PAD, HINT_RADIUS, BINS, SILU, PRECISE)
    if ticket == PARTS - 1:
        tl.debug_barrier()  # the resolved parts stored by every thread before they are read or released
        if PARTS == 1:
            tl.atomic_xchg(arrivals, 0)
        else:
            tl.atomic_add(arrivals, PARTS, sem="release")
    else:
        released = _acquire_load(arrivals)
        while released < 2 * PARTS:
            released = _acquire_load(arrivals)
        if tl.atomic_add(arrivals + 1, 1, sem="relaxed") == PARTS - 2:  # the last waiter out re-arms the tickets
            tl.atomic_xchg(arrivals, 0)
            tl.atomic_xchg(arrivals + 1, 0)
    _write_part(x, key, valid, offs, part_ptr + (row * PARTS + part) * BINS, out_ptr + row * stride_out,
                index_ptr + row * k, y_ptr + row * stride_y, zeros_ptr, COUNT_ZEROS, WRITE_INDICES, MULTIPLY, PRECISE)


@triton.jit
def _topk_rows_split_write_kernel(x_ptr, y_ptr, out_ptr, zeros_ptr, index_ptr, part_ptr, dim, k, stride_x, stride_y,
                                  stride_out, INF_KEY: tl.constexpr, PART: tl.constexpr, PARTS: tl.constexpr,
                                  BINS: tl.constexpr, COUNT_ZEROS: tl.constexpr, WRITE_INDICES: tl.constexpr,
                                  SILU: tl.constexpr, MULTIPLY: tl.constexpr, PRECISE: tl.constexpr,
                                  PDL: tl.constexpr, EARLY_DEPENDENTS: tl.constexpr = False):
    """Second launch of a split selection: each program writes its part of the sparse row (and its slots of the
    kept features' list) from what `_topk_rows_split_count_kernel` resolved for it (``SILU``: of the row's SiLU;
    ``MULTIPLY``: times the row of ``y``, a gated FFN's up projection, as `_topk_rows_kernel` does).
    ``EARLY_DEPENDENTS``: the kernel after it (down's GEMV) may start while the counting launch still runs, so that
    what it prefetches before its wait overlaps both."""
    row, part = _split_program_start(EARLY_DEPENDENTS, PDL)
    x, key, valid, offs = _chunk_of_row(x_ptr + row * stride_x, dim, part, INF_KEY, PART, SILU, PRECISE)
    _write_part(x, key, valid, offs, part_ptr + (row * PARTS + part) * BINS, out_ptr + row * stride_out,
                index_ptr + row * k, y_ptr + row * stride_y, zeros_ptr, COUNT_ZEROS, WRITE_INDICES, MULTIPLY, PRECISE)


def launch_config(block: int, silu: bool = False, hinted: bool = False,
                  dtype: torch.dtype = torch.bfloat16) -> tuple:
    """Default launch for rows padded to ``block`` features (the same for any number of rows: one program each, or
    a split launch's parts of each): ``(digit_bits, num_warps)`` of the register kernel, ``("streamed", chunk,
    num_warps)`` of the streamed one, or (``hinted``: the search starts from a threshold hint) ``("split", part,
    num_warps)`` of the split one.

    One bit per reduction step and at most 1024 keys per warp (32 per thread), 4 to 32 warps. On an H200 this was
    within 0.5 µs of the best of every (digit bits, warps) pair for one decode token of 4096 and 14336 features
    (``bench_topk.py --one-row``), and timing the candidates at conversion picked worse launches than this rule
    (the differences are below the noise of one-shot timing). Rows padded past 16384 keys (Qwen2-7B's 18944-wide
    activation) spill registers in the register kernel, so they are streamed in 4096-key chunks by 16 warps: one
    hinted token of 18944 features took 17.5 µs against 33.6 µs, and a compiled Qwen2 decode step's selections
    fell from 51.4 to 38.6 µs per layer (``benchmarks/results/decode_qwen2_profile_4layers.json``). The streamed
    kernel has no fused SiLU: ``silu=True`` launches of wide rows keep the register kernel, with 32 warps.

    Hinted rows padded past 8192 keys (a decode step's FFN activation) are split over programs of 512 keys (4
    warps; wider parts where a row would need more than `_split_parts_limit` of them), which count their part in
    one pass; the last to finish resolves the threshold, and a second launch writes the parts. One hinted token on
    an H200 (``benchmarks/results/topk_one_row_split.json``), µs: 14336 features 6.3 against 13.6 (register
    kernel), 18944 features 7.1 against 19.2 (streamed). At 4096 features it measured 5.5 against 6.3, once; rows
    that narrow keep the register kernel until a decode run confirms it, with 8 keys a thread where hinted (16
    warps at 4096 keys): in a compiled step a one-program selection waits on every instruction it fetches, and the
    code shrinks with the keys a thread holds (`HISTOGRAM_KEYS_PER_THREAD`).

    Example:
        >>> launch_config(4096), launch_config(4096, hinted=True)
        ((1, 4), (1, 16))
        >>> launch_config(32768)
        ('streamed', 4096, 16)
        >>> launch_config(16384, hinted=True)
        ('split', 512, 4)
    """
    if hinted and not silu and block > SPLIT_FROM_KEYS:
        return split_launch(block, dtype)
    if block > 16384 and not silu:
        return STREAMED_WIDE_ROWS
    return _register_launch(block, hinted)


def split_launch(block: int, dtype: torch.dtype = torch.bfloat16) -> tuple[str, int, int]:
    """The default ``("split", part, num_warps)`` launch for hinted rows padded to ``block`` keys: parts of
    `SPLIT_PART` keys, wider where a row would need more than `_split_parts_limit` of them, 4 warps per 1024 keys
    (at least 4). `launch_config` picks it for wide rows without SiLU; a compiled decode step asks for it for a
    gated FFN's activation with SiLU and the product with up (`ops.silu_select`).

    Example:
        >>> split_launch(32768), split_launch(32768, torch.float16)
        (('split', 512, 4), ('split', 4096, 4))
    """
    part = SPLIT_PART
    while block // part > _split_parts_limit(dtype):
        part *= 2
    return "split", part, max(4, part // 1024)


def _split_bins(dtype: torch.dtype) -> int:
    """Histogram bins of a split launch: the hint's window, one bin below it and one above, to a power of two."""
    return 1 << (2 * HINT_RADIUS[dtype] + 1).bit_length()


def _split_parts_limit(dtype: torch.dtype) -> int:
    """The most parts a split launch divides a row into: the last program holds every part's histogram in
    registers (64 x 128 bins for bf16; fp16's 512-key window allows 8 parts)."""
    return min(64, 8192 // _split_bins(dtype))


def _register_launch(block: int, hinted: bool = False) -> tuple[int, int]:
    """The register kernel's default ``(digit_bits, num_warps)`` for rows padded to ``block`` keys (see
    `launch_config`): hinted rows up to `SPLIT_FROM_KEYS` keys (a decode token's) take 8 keys a thread, 16 warps at
    most, others 32 keys a thread."""
    if hinted and block <= SPLIT_FROM_KEYS:
        return 1, max(4, min(16, block // (32 * HISTOGRAM_KEYS_PER_THREAD)))
    return 1, max(4, min(32, block // 1024))


def _launch_candidates(block: int) -> list[tuple[int, int]]:
    # at most 64 keys per thread: more spills registers (and takes long to compile)
    return [(bits, warps) for bits in (1, 2) for warps in (2, 4, 8, 16, 32) if 32 * warps <= block <= 2048 * warps]


#: ``("streamed", chunk, num_warps)`` launches worth timing against the register kernel's (bench_topk.py).
STREAMED_CANDIDATES = (("streamed", 2048, 8), ("streamed", 4096, 8), ("streamed", 4096, 16), ("streamed", 8192, 16))
STREAMED_WIDE_ROWS = STREAMED_CANDIDATES[2]
#: ``("split", part, num_warps)`` launches worth timing (bench_topk.py), hinted rows only.
SPLIT_CANDIDATES = (("split", 256, 2), ("split", 256, 4), ("split", 512, 4), ("split", 1024, 8), ("split", 1024, 16),
                    ("split", 2048, 16))
#: A hinted bf16 row whose threads hold at most this many keys each searches the hint's window with one histogram
#: (`_kth_largest_key_histogram`) instead of a binary search: fewer barriers, and few keys a thread keep the
#: histogram's code short (3584-key rows, 16 warps: 1008 SASS instructions, 896 for the binary search; 2992 with 4
#: warps, 32 keys a thread). In a compiled Qwen2-7B step the three one-token selections of a layer took 4.63 us a
#: call this way, 4.76 with 16 warps' binary search and 5.01 with the 4 warps of before (H100).
HISTOGRAM_KEYS_PER_THREAD = 8
#: Hinted rows padded past this many keys take the split launch by default, in parts of (at least) this many keys.
SPLIT_FROM_KEYS = 8192
SPLIT_PART = 512
_INF_KEY = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}
# Compiled kernels compute SiLU with libdevice; Triton's interpreter has none (see `_silu`).
_PRECISE = os.environ.get("TRITON_INTERPRET") != "1"
#: Half the width of the key window searched first around a threshold hint (a power of two), per dtype: about
#: ±25 % of magnitude around the previous threshold (bf16 keeps 7 mantissa bits, fp16 10), found in
#: log2(2 * radius) reductions (6 and 9) instead of 15.
HINT_RADIUS = {torch.bfloat16: 32, torch.float16: 256}


class _RowLaunch:
    """One (row width, k, dtype, outputs) launch of the kernel with everything but the tensors worked out, so that a
    call costs one dictionary lookup on top of Triton's own launch (eager decode runs four of these per layer)."""

    def __init__(self, dim: int, k: int, dtype: torch.dtype, indices: bool, count_zeros: bool,
                 config: tuple | None, hinted: bool, silu: bool = False, multiply: bool = False,
                 early_dependents: bool = False) -> None:
        if dtype not in _INF_KEY:
            raise TypeError(f"topk_sparsify_rows takes bf16 or fp16, got {dtype}")
        if not 1 <= k <= dim:
            raise ValueError(f"k must be in [1, {dim}], got {k}")
        if indices and dim > MAX_LISTED_FEATURES:
            raise ValueError(f"topk_sparsify_rows lists kept features of rows up to {MAX_LISTED_FEATURES} wide, "
                             f"got {dim}")
        block = 1 << (dim - 1).bit_length()  # next power of two (triton.next_power_of_2 costs microseconds)
        if config is not None and len(config) != 2 and (len(config) != 3 or config[0] not in ("streamed", "split")):
            raise ValueError(f"config is (digit_bits, num_warps), ('streamed', chunk, num_warps) or ('split', part, "
                             f"num_warps), got {config!r}")
        if multiply and not silu:
            raise ValueError("the product with a second tensor is fused only after SiLU")
        self.dim, self.k, self.indices = dim, k, indices
        self.parts = 0  # programs per row of a split launch
        config = config or launch_config(block, silu, hinted, dtype)
        if config[0] == "split":
            _, part, num_warps = config
            self.parts = -(-dim // part)
            limit = _split_parts_limit(dtype)
            if not hinted or part & (part - 1) or not 32 * num_warps <= part <= 32768 or self.parts > limit:
                raise ValueError(f"a split launch takes a threshold hint and a power-of-two part of 32 * num_warps "
                                 f"to 32768 keys, at most {limit} parts a row, got part {part}, {num_warps} warps, "
                                 f"{self.parts} parts, hint {hinted}")
            self.bins = _split_bins(dtype)
            shared = dict(INF_KEY=_INF_KEY[dtype], PART=part, PARTS=self.parts, BINS=self.bins, SILU=silu,
                          PRECISE=_PRECISE, num_warps=num_warps, **pdl_constants(), **_silu_options(silu))
            self.launch = KernelLaunch(_topk_rows_split_count_kernel, dict(
                PARTS_PAD=1 << (self.parts - 1).bit_length(), HINT_RADIUS=HINT_RADIUS[dtype], **shared))
            self.write = KernelLaunch(_topk_rows_split_write_kernel, dict(
                COUNT_ZEROS=count_zeros, WRITE_INDICES=indices, MULTIPLY=multiply,
                EARLY_DEPENDENTS=early_dependents, **shared))
            self.single = KernelLaunch(_topk_rows_split_kernel, dict(
                PARTS_PAD=1 << (self.parts - 1).bit_length(), HINT_RADIUS=HINT_RADIUS[dtype],
                COUNT_ZEROS=count_zeros, WRITE_INDICES=indices, MULTIPLY=multiply,
                EARLY_DEPENDENTS=early_dependents, **shared))
            return
        if config[0] == "streamed":
            _, chunk, num_warps = config
            if silu or chunk & (chunk - 1) or not 32 * num_warps <= chunk <= 32768:
                raise ValueError(f"a streamed launch takes a power-of-two chunk of 32 * num_warps to 32768 keys "
                                 f"and no SiLU, got chunk {chunk}, {num_warps} warps, silu={silu}")
            self.launch = KernelLaunch(_topk_rows_streamed_kernel, dict(
                INF_KEY=_INF_KEY[dtype], CHUNK=chunk, CHUNKS=-(-dim // chunk), COUNT_ZEROS=count_zeros,
                WRITE_INDICES=indices, USE_HINT=hinted, HINT_RADIUS=HINT_RADIUS[dtype],
                HINT_STEPS=HINT_RADIUS[dtype].bit_length(), num_warps=num_warps, **pdl_constants()))
            return
        digit_bits, num_warps = config
        if digit_bits not in (1, 2):
            raise ValueError(f"digit_bits must be 1 or 2, got {digit_bits}")
        histogram = (hinted and dtype == torch.bfloat16
                     and block <= HISTOGRAM_KEYS_PER_THREAD * 32 * num_warps)
        constants = dict(
            INF_KEY=_INF_KEY[dtype], BLOCK=block, DIGIT_BITS=digit_bits, COUNT_ZEROS=count_zeros,
            WRITE_INDICES=indices, USE_HINT=hinted, HINT_RADIUS=HINT_RADIUS[dtype],
            HINT_STEPS=HINT_RADIUS[dtype].bit_length(), SILU=silu, MULTIPLY=multiply, PRECISE=_PRECISE,
            HINT_HISTOGRAM=histogram, num_warps=num_warps, **pdl_constants(), **_silu_options(silu))
        self.launch = KernelLaunch(_topk_rows_kernel, constants)

    def __call__(self, x: torch.Tensor, rows: int, stride: int, zeros: torch.Tensor | None,
                 hint: torch.Tensor | None, y: torch.Tensor | None = None, stride_y: int = 0):
        """Launch over ``x``: ``rows`` rows ``stride`` elements apart, unit stride within a row (a contiguous
        tensor of any shape, or a 2-D view); the sparse result has ``x``'s shape. ``y``: the rows (``stride_y``
        apart) that a launch with ``multiply`` multiplies the kept values by."""
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        kept = torch.empty(rows, self.k, dtype=torch.int32, device=x.device) if self.indices else None
        if rows and self.parts:
            histograms = _scratch(x.device, rows * self.parts * self.bins).view(torch.int32)
            outputs = (x if y is None else y, out, x if zeros is None else zeros, out if kept is None else kept)
            if _one_launch(x.device, rows * self.parts):
                self.single((rows, self.parts), (x, *outputs, hint, histograms, _semaphores(x.device, 2 * rows)),
                            (self.dim, self.k, stride, stride_y, self.dim))
                return out, kept
            self.launch((rows, self.parts), (x, hint, histograms, _semaphores(x.device, rows)),
                        (self.dim, self.k, stride))
            self.write((rows, self.parts), (x, *outputs, histograms), (self.dim, self.k, stride, stride_y, self.dim))
        elif rows:
            self.launch((rows,), (x, x if y is None else y, out, x if zeros is None else zeros,
                                  out if kept is None else kept, out if hint is None else hint),
                        (self.dim, self.k, stride, stride_y, self.dim))
        return out, kept


_SMS: dict[int, int] = {}


def _one_launch(device: torch.device, programs: int) -> bool:
    """Whether a split selection of ``programs`` runs in one launch (`kernels.SPLIT_SELECT_ONE_LAUNCH`, a CUDA
    device, at most one program per SM: its programs wait for each other, so all of them must be resident at once;
    never in the interpreter, which runs them one after another)."""
    from qsparse_hf import kernels

    if not kernels.SPLIT_SELECT_ONE_LAUNCH or device.type != "cuda" or not _PRECISE:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    sms = _SMS.get(index)
    if sms is None:
        sms = _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return programs <= sms


def _silu_options(silu: bool) -> dict:
    """Compiler options of a launch that computes SiLU: libdevice's expf and division keep denormals, as CUDA's do."""
    return {"enable_reflect_ftz": False} if silu and _PRECISE else {}


_ROW_LAUNCHES: dict[tuple, _RowLaunch] = {}


def _row_launch(*key) -> _RowLaunch:
    """The launch object for ``(dim, k, dtype, indices, count_zeros, config, hinted[, silu, multiply,
    early_dependents])``."""
    launch = _ROW_LAUNCHES.get(key)
    if launch is None:
        launch = _ROW_LAUNCHES[key] = _RowLaunch(*key)
    return launch


def _check_hint(hint: torch.Tensor | None, rows: int, device: torch.device) -> None:
    if hint is not None and (hint.dtype != torch.int32 or hint.numel() < rows or hint.device != device):
        raise ValueError(f"hint must be an int32 tensor with one entry per row ({rows}) on {device}, got "
                         f"{hint.dtype} with {hint.numel()} on {hint.device}")


def repeat_row_launch(x: torch.Tensor, k: int, zeros: torch.Tensor | None = None, *, indices: bool = False,
                      hint: torch.Tensor | None = None, silu: bool = False, multiply: bool = False) -> _RowLaunch:
    """The launch `topk_sparsify_rows` (with ``silu``: `silu_topk_rows`, ``multiply``: with ``up``) makes for these
    arguments, to repeat it for inputs of the same shape, dtype and device (an eager decode step skips the
    lookups): ``launch(x, rows, row_stride, zeros, hint[, up, up_row_stride])`` returns ``(sparse, kept)``
    (``kept`` None without ``indices``) for a contiguous ``x`` of ``rows`` rows. Raises as those functions do for
    arguments they reject.

    Example:
        >>> launch = repeat_row_launch(x, 64, indices=True)  # doctest: +SKIP
        >>> sparse, kept = launch(x, 1, x.shape[-1], None, None)  # doctest: +SKIP
    """
    _check_hint(hint, x.numel() // x.shape[-1], x.device)
    return _row_launch(x.shape[-1], k, x.dtype, indices, zeros is not None, None, hint is not None, silu, multiply)


def new_hint(device: torch.device | str, rows: int) -> torch.Tensor:
    """A threshold hint for ``rows`` rows (`topk_sparsify_rows`'s ``hint``), holding no guess yet.

    Example:
        >>> new_hint("cpu", 2)
        tensor([-1, -1], dtype=torch.int32)
    """
    return torch.full((rows,), -1, dtype=torch.int32, device=device)


def topk_sparsify_rows(x: torch.Tensor, k: int, zeros: torch.Tensor | None = None, *,
                       indices: bool = False, config: tuple | None = None, hint: torch.Tensor | None = None):
    """Zero all but the ``k`` largest ``|x|`` of every row (last dimension) of a bf16/fp16 tensor.

    Same result as ``x * functional.topk_mask(x, k)``, bit for bit (ties at the threshold kept lowest index first,
    NaN ranked as infinity). With ``zeros`` (an int64 scalar tensor on the same device) the number of zeros written
    is added to it in the same launch. With ``indices=True`` the result is ``(sparse, kept)``: ``kept`` is an int32
    ``[rows, k]`` tensor of the kept positions of each row, ascending (rows = all leading dimensions flattened).
    ``config`` (``(digit_bits, num_warps)``, ``("streamed", chunk, num_warps)``: the kernel that streams the row
    in chunks instead of holding it in registers, for wide rows, or ``("split", part, num_warps)``, with ``hint``
    only: the row counted by many programs, a part each) overrides the default launch (`launch_config`); the result
    is the same.
    ``hint`` (int32, one entry per row, from `new_hint`) is where the kernel keeps each row's last threshold and
    starts its search from: decode steps of one sparsifier find the next threshold in fewer steps. It never
    changes the result, only how fast it is found; the kernel updates it in place.

    Example:
        >>> import os; os.environ.setdefault("TRITON_INTERPRET", "1")  # doctest: +SKIP
        >>> topk_sparsify_rows(torch.tensor([[0.5, -2.0, 1.0, 0.1]], dtype=torch.bfloat16), 2)  # doctest: +SKIP
        tensor([[ 0., -2.,  1.,  0.]], dtype=torch.bfloat16)
    """
    launch = _row_launch(x.shape[-1], k, x.dtype, indices, zeros is not None, config, hint is not None)
    out, kept = _launch_over_rows(launch, x, zeros, hint)
    return (out, kept) if indices else out


def _launch_over_rows(launch: _RowLaunch, x: torch.Tensor, zeros: torch.Tensor | None, hint: torch.Tensor | None,
                      up: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``launch`` over the rows of ``x`` (and of ``up``, for a launch that multiplies): ``(sparse, kept)``, the
    sparse result in ``x``'s shape."""
    source, rows, stride = _as_rows(x)
    _check_hint(hint, rows, x.device)
    y, stride_y = (None, 0) if up is None else _as_rows(up)[::2]
    out, kept = launch(source, rows, stride, zeros, hint, y, stride_y)
    return (out if out.shape == x.shape else out.reshape(x.shape)), kept


def _as_rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``(rows_tensor, rows, row_stride)``: ``x`` itself when contiguous (the common case: eager decode runs this
    on every selection), else a 2-D view with unit stride along a row (a copy only where the view has none)."""
    dim = x.shape[-1]
    if x.is_contiguous():
        return x, x.numel() // dim, dim
    source = x.reshape(-1, dim)
    if source.stride(-1) != 1:
        source = source.contiguous()
    return source, source.shape[0], source.stride(0)


def silu_topk_rows(gate: torch.Tensor, k: int, up: torch.Tensor | None = None, zeros: torch.Tensor | None = None,
                   *, indices: bool = False, hint: torch.Tensor | None = None, config: tuple | None = None,
                   early_dependents: bool = False):
    """A gated FFN's activation in one launch: the top-``k`` of ``silu(gate)`` per row (bf16/fp16), and with ``up``
    that times ``up``: ``topk(F.silu(gate), k) * up`` bit for bit (SiLU computed as PyTorch's CUDA kernel does).

    ``zeros`` counts the zeros of the top-K itself (before the product), as the activation's sparsity counter
    does; ``indices`` and ``hint`` as in `topk_sparsify_rows`. On the GPU an eager one-token decode step runs this
    instead of three kernels (SiLU, top-K, product). ``config``: the register kernel's ``(digit_bits, num_warps)``
    (the default, one program a row) or, with ``hint``, a ``("split", part, num_warps)`` launch (`split_launch`:
    many programs a row, two launches; what a compiled decode step runs for wide rows). ``early_dependents``: a
    split launch lets the kernel after it start while its counting launch runs (`GEMV_PREFETCH_DOWN`).

    Example:
        >>> gate = torch.tensor([[0.5, -2.0, 1.0, 3.0]], dtype=torch.bfloat16)  # doctest: +SKIP
        >>> silu_topk_rows(gate, 2, up=torch.full_like(gate, 2.0))  # doctest: +SKIP
        tensor([[0.0000, 0.0000, 1.4609, 5.7188]], dtype=torch.bfloat16)
    """
    if up is not None and (up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device):
        raise ValueError(f"up must match gate's shape, dtype and device ({tuple(gate.shape)}, {gate.dtype}, "
                         f"{gate.device}), got {tuple(up.shape)}, {up.dtype}, {up.device}")
    launch = _row_launch(gate.shape[-1], k, gate.dtype, indices, zeros is not None, config, hint is not None, True,
                         up is not None, early_dependents)
    out, kept = _launch_over_rows(launch, gate, zeros, hint, up)
    return (out, kept) if indices else out


_NORM_LAUNCHES: dict[tuple, KernelLaunch] = {}


def norm_topk_rows(hidden: torch.Tensor, weight: torch.Tensor, eps: float, k: int,
                   residual: torch.Tensor | None = None, hint: torch.Tensor | None = None):
    """A decoder layer's residual add and RMSNorm (Llama's: ``weight * (h * rsqrt(mean(h^2) + eps))``, ``h`` the sum
    in fp32, the normed row rounded to the input's dtype before the product) and the top-``k`` of the normed row, in
    one launch of one program a row: ``(summed, normed, sparse, kept)``. ``summed`` is ``residual + hidden`` (None
    without ``residual``: then ``hidden`` is normed as it is), ``normed`` the norm's output, ``sparse`` its top-K
    (`topk_sparsify_rows`'s, bit for bit) and ``kept`` the ``[rows, k]`` ascending kept positions. Every rounding
    is the model's (the sum and the normed row in the input's dtype, then the product with ``weight``), and the
    mean and rsqrt are computed as CUDA does (rsqrtf), so a row differs from the module's output only where the
    sum of squares is added in another order. Rows up to `MAX_NORM_FEATURES` wide, bf16/fp16, ``weight`` of the
    same dtype; ``hint`` as in `topk_sparsify_rows`. A compiled decode step runs it where it would run the
    compiler's add-and-norm kernel and then the selection (`layers.DecoderLayerForward`).

    Example:
        >>> hidden = torch.tensor([[3.0, -4.0, 0.0, 1.0]], dtype=torch.bfloat16)  # doctest: +SKIP
        >>> norm_topk_rows(hidden, torch.ones(4, dtype=torch.bfloat16), 1e-6, 2)[2]  # doctest: +SKIP
        tensor([[ 1.1797, -1.5703,  0.0000,  0.0000]], dtype=torch.bfloat16)
    """
    dim = hidden.shape[-1]
    if hidden.dtype not in _INF_KEY or weight.dtype != hidden.dtype or weight.shape != (dim,):
        raise ValueError(f"norm_topk_rows takes bf16/fp16 rows and a weight of their dtype and width, got "
                         f"{hidden.dtype} rows {dim} wide and a {weight.dtype} weight of shape {tuple(weight.shape)}")
    if not 1 <= k <= dim <= MAX_NORM_FEATURES:
        raise ValueError(f"norm_topk_rows takes rows up to {MAX_NORM_FEATURES} wide and k in [1, width], got width "
                         f"{dim}, k {k}")
    if residual is not None and (residual.shape != hidden.shape or residual.dtype != hidden.dtype):
        raise ValueError(f"residual must match hidden ({tuple(hidden.shape)}, {hidden.dtype}), got "
                         f"{tuple(residual.shape)}, {residual.dtype}")
    rows = hidden.numel() // dim
    _check_hint(hint, rows, hidden.device)
    key = (dim, hidden.dtype, hint is not None, residual is not None)
    launch = _NORM_LAUNCHES.get(key)
    if launch is None:
        block = 1 << (dim - 1).bit_length()
        digit_bits, num_warps = _register_launch(block, hint is not None)
        launch = _NORM_LAUNCHES[key] = KernelLaunch(_norm_topk_rows_kernel, dict(
            INF_KEY=_INF_KEY[hidden.dtype], BLOCK=block, DIGIT_BITS=digit_bits, USE_HINT=hint is not None,
            HINT_RADIUS=HINT_RADIUS[hidden.dtype], HINT_STEPS=HINT_RADIUS[hidden.dtype].bit_length(),
            RESIDUAL=residual is not None, PRECISE=_PRECISE, num_warps=num_warps,
            HINT_HISTOGRAM=(hint is not None and hidden.dtype == torch.bfloat16
                            and block <= HISTOGRAM_KEYS_PER_THREAD * 32 * num_warps), **pdl_constants()))
    hidden = hidden.contiguous()
    summed = None if residual is None else torch.empty_like(hidden)
    normed, sparse = torch.empty_like(hidden), torch.empty_like(hidden)
    kept = torch.empty(rows, k, dtype=torch.int32, device=hidden.device)
    if rows:
        launch((rows,), (hidden, hidden if residual is None else residual.contiguous(), weight,
                         normed if summed is None else summed, normed, sparse, kept, kept if hint is None else hint),
               (dim, k, float(eps)))
    return summed, normed, sparse, kept
