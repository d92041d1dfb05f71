"""One-token attention for decoding, over the key/value cache as transformers keeps it, in one launch.

A decode step's attention is small work (one query per head against a few hundred cached positions) that transformers'
SDPA path spreads over five kernels on a compiled step: the grouped key and value heads copied out to one per query
head (``repeat_kv``), the query and output re-laid, and the fused attention kernel itself. Here the query heads that
share a key/value head are one program's rows (one ``tl.dot`` against each block of cached positions, the cache read
where it lies), the positions are split over programs (split-KV, "flash decoding"), and the last split of a key/value
head to finish merges the partial softmaxes in split order (deterministic) in the same launch, as the split-K GEMVs
do (`gemv`).

The mask is transformers' boolean one (True: attend), or none (every cached position is attended).

`decode_attention_append` is the same launch with what the model's code does before attention folded in: the
rotary embedding of the query and the step's key, and the append of that key and value to a static cache at its
count (stored by the program whose split covers the position, read there from registers). The count is read,
not advanced: transformers' ``StaticCache`` also derives the step's positions from its first layer's count, so
the compiler must see the advance as the model's own ``add_`` (`ops.decode_attention_append` does it after the
launch, or `qsparse_hf.attention` once for every layer after the step's last one). Advanced inside the launch,
Inductor recomputed the later layers' rotary and mask from the count already moved on (positions off by one from
the second layer on).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemv import _cdiv, _prefetch_l2
from .launch import KernelLaunch, _dependent_launch_start, _scratch, _semaphores, pdl_constants, pdl_enabled
from .topk import _PRECISE, _round_like

__all__ = ["decode_attention", "decode_attention_append", "check_decode_attention", "check_decode_append",
           "MAX_HEAD_DIM"]

#: Widest head the kernel serves (a program holds a ``[group, head_dim]`` accumulator per query group).
MAX_HEAD_DIM = 256
#: Cached positions one program step reads per key/value head.
_BLOCK_S = 64
#: At most this many splits per key/value head (the last to finish loads every split's partials at once to merge them).
_MAX_SPLITS = 16
#: Warps per program.
_NUM_WARPS = 4
#: Programs a launch aims for in all (about one wave on a 132-SM GPU), before `_MAX_SPLITS` caps the split.
_TARGET_PROGRAMS = 128
#: Blocks of cached positions a split takes at least (splitting further makes more partials to merge).
_MIN_BLOCKS_PER_SPLIT = 1
#: Blocks of positions that no query row sees (past the cache's end, or hidden by the mask) read no keys or values
#: (then a NaN cached at a hidden position no longer reaches the output through its zero weight, as it does in SDPA).
_SKIP_HIDDEN = False
#: The append's stores after the loop over the cache rather than before it.
_STORE_LAST = False


@triton.jit
def _rounded(value, like, PRECISE: tl.constexpr):
    """fp32 ``value`` rounded to nearest even in ``like``'s dtype, kept in fp32, in a form the compiler keeps: a
    product converted to bf16 and back and then added is contracted into one bf16 fused multiply-add (one rounding
    instead of two; seen in the PTX for sm_90), so bf16 is rounded on the bits (`topk._round_like`'s rounding by
    hand, which no product feeds) and fp16 by an inline ``cvt.rn``."""
    if like.dtype == tl.bfloat16:
        rounded = _round_like(value, like, False).to(tl.float32)
    elif PRECISE:
        rounded = tl.inline_asm_elementwise("{ .reg .f16 half; cvt.rn.f16.f32 half, $1; cvt.f32.f16 $0, half; }",
                                            "=f,f", [value], dtype=tl.float32, is_pure=True, pack=1)
    else:
        rounded = value.to(like.dtype).to(tl.float32)
    return rounded


@triton.jit
def _rotary(x, partner, cos, signed_sin, like, PRECISE: tl.constexpr):
    """``x cos + rotate_half(x) sin`` in ``like``'s dtype, from fp32 values: both products and the sum rounded,
    as eager PyTorch rounds them in bf16/fp16 (``signed_sin``: sin, negated over the first half of the head)."""
    first = _rounded(x * cos, like, PRECISE)
    second = _rounded(partner * signed_sin, like, PRECISE)
    return _rounded(first + second, like, PRECISE).to(like.dtype)


@triton.jit
def _finish(acc, total, at, length, APPEND: tl.constexpr):
    """The softmax-weighted values; NaN for a token appended past the cache's end (neither stored nor attended)."""
    out = acc / total[:, None]
    if APPEND:
        out = tl.where(at >= length, float("nan"), out)
    return out


@triton.jit
def _prefetch_split(k_base, v_base, split, length, stride_ks, stride_vs, HEAD_DIM: tl.constexpr,
                    BLOCK_S: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr):
    """Ask L2 for this split's cached keys and values (every 128-byte line of each position's head) before the
    launch's wait: no kernel of the step writes them before this launch (the step's own position is stored by this
    launch, after its wait), and memory is where a one-token attention waits. A guess about what L2 should hold;
    it never changes what the launch computes."""
    LINE: tl.constexpr = 64  # bf16/fp16 values in 128 bytes
    LINES: tl.constexpr = (HEAD_DIM + LINE - 1) // LINE
    lines = tl.arange(0, LINES) * LINE
    for block in tl.static_range(BLOCKS_PER_SPLIT):
        pos = (split * BLOCKS_PER_SPLIT + block) * BLOCK_S + tl.arange(0, BLOCK_S)
        wanted = (pos < length)[:, None] & (lines < HEAD_DIM)[None, :]
        _prefetch_l2(k_base + pos[:, None] * stride_ks + lines[None, :], wanted)
        _prefetch_l2(v_base + pos[:, None] * stride_vs + lines[None, :], wanted)


@triton.jit
def _store_appended(k_base, v_base, new_k, new_v, at, split, length, stride_ks, stride_vs, dims, dim_ok,
                    BLOCK_S: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr):
    """The step's rotated key and its value stored at the cache's count, by the split that covers it."""
    if (at < length) & (at // (BLOCKS_PER_SPLIT * BLOCK_S) == split):
        tl.store(k_base + at * stride_ks + dims, new_k, mask=dim_ok)
        tl.store(v_base + at * stride_vs + dims, new_v.to(v_base.dtype.element_ty), mask=dim_ok)


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, part_ptr, sem_ptr, new_k_ptr, new_v_ptr, cos_ptr, sin_ptr, count_ptr,
    length, scale, stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_mb,
    stride_ob, stride_oh, stat_offset, stride_nkb, stride_nkh, stride_nvb, stride_nvh, stride_cb,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr, MAX_SPLITS: tl.constexpr, HAS_MASK: tl.constexpr,
    APPEND: tl.constexpr, PRECISE: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr = False,
    SKIP_HIDDEN: tl.constexpr = False, STORE_LAST: tl.constexpr = False,
):
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    batch = tl.program_id(2)
    if PREFETCH:  # (`kernels.ATTENTION_PREFETCH`, with PDL: while the kernel before this one still runs)
        _prefetch_split(k_ptr + batch * stride_kb + kv_head * stride_kh,
                        v_ptr + batch * stride_vb + kv_head * stride_vh, split, length, stride_ks, stride_vs,
                        HEAD_DIM, BLOCK_S, BLOCKS_PER_SPLIT)
    _dependent_launch_start(PDL)
    splits = tl.num_programs(1)
    rows = tl.arange(0, GROUP_PAD)
    row_ok = rows < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    heads = kv_head * GROUP + rows
    # bf16/fp16 values are exact in tf32: the scores' products are exact, accumulated in fp32 (and Triton's CPU
    # interpreter mishandles bf16 dots)
    q_rows = q_ptr + batch * stride_qb + heads[:, None] * stride_qh
    q = tl.load(q_rows + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
    at = 0
    if APPEND:
        # The step's own token: rotary on its query and key (``x cos + rotate_half(x) sin``, each product and the
        # sum rounded to the cache's dtype as the model's code rounds them in eager mode: one bit of a query can
        # move a feature across the next top-K's cut-off), its key and value stored at the cache's count, and read
        # from registers at that position by the split that covers it (another program may store them while this
        # one reads the cache).
        HALF: tl.constexpr = HEAD_DIM // 2
        partner = tl.where(dims < HALF, dims + HALF, dims - HALF)
        sign = tl.where(dims < HALF, -1.0, 1.0)
        cos = tl.load(cos_ptr + batch * stride_cb + dims, mask=dim_ok, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + batch * stride_cb + dims, mask=dim_ok, other=0.0).to(tl.float32)
        q_partner = tl.load(q_rows + partner[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                            other=0.0).to(tl.float32)
        like = tl.zeros([BLOCK_D], dtype=k_ptr.dtype.element_ty)
        q = _rotary(q, q_partner, cos[None, :], (sign * sin)[None, :], like[None, :], PRECISE).to(tl.float32)
        new_k_row = new_k_ptr + batch * stride_nkb + kv_head * stride_nkh
        new_k = tl.load(new_k_row + dims, mask=dim_ok, other=0.0).to(tl.float32)
        new_k_partner = tl.load(new_k_row + partner, mask=dim_ok, other=0.0).to(tl.float32)
        new_k = _rotary(new_k, new_k_partner, cos, sign * sin, like, PRECISE)
        new_v = tl.load(new_v_ptr + batch * stride_nvb + kv_head * stride_nvh + dims, mask=dim_ok, other=0.0)
        at = tl.load(count_ptr)
        if not STORE_LAST:
            _store_appended(k_base, v_base, new_k, new_v, at, split, length, stride_ks, stride_vs, dims, dim_ok,
                            BLOCK_S, BLOCKS_PER_SPLIT)
    best = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)  # running maximum of each row's scores
    total = tl.zeros([GROUP_PAD], dtype=tl.float32)  # running sum of exp(score - best)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
    first = split * BLOCKS_PER_SPLIT * BLOCK_S
    if SKIP_HIDDEN:
        # the split's whole mask at once (it depends on nothing), so that blocks past the cache's end or hidden from
        # every query row read neither keys nor values: such a block adds exactly nothing to the softmax
        split_pos = first + tl.arange(0, BLOCKS_PER_SPLIT * BLOCK_S)
        split_visible = split_pos < length
        if HAS_MASK:
            split_visible &= tl.load(mask_ptr + batch * stride_mb + split_pos, mask=split_visible, other=0) != 0
        if APPEND:
            split_visible |= (split_pos == at) & (at < length)
        blocks_visible = tl.max(tl.reshape(split_visible.to(tl.int32), [BLOCKS_PER_SPLIT, BLOCK_S]), axis=1)
    for block in tl.range(0, BLOCKS_PER_SPLIT):
        pos = first + block * BLOCK_S + tl.arange(0, BLOCK_S)
        cached = pos < length
        visible = cached
        if HAS_MASK:
            visible = visible & (tl.load(mask_ptr + batch * stride_mb + pos, mask=cached, other=0) != 0)
        if SKIP_HIDDEN:
            cached = cached & (tl.sum(tl.where(tl.arange(0, BLOCKS_PER_SPLIT) == block, blocks_visible, 0)) > 0)
        load_ok = cached[:, None] & dim_ok[None, :]
        k = tl.load(k_base + pos[:, None] * stride_ks + dims[None, :], mask=load_ok, other=0.0).to(tl.float32)
        v = tl.load(v_base + pos[:, None] * stride_vs + dims[None, :], mask=load_ok, other=0.0).to(tl.float32)
        if APPEND:
            here = (pos == at)[:, None]
            k = tl.where(here, new_k.to(tl.float32)[None, :], k)
            v = tl.where(here, new_v.to(tl.float32)[None, :], v)
        scores = tl.dot(q, tl.trans(k), input_precision="tf32") * scale
        scores = tl.where(visible[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        shift = tl.where(new_best == float("-inf"), 0.0, new_best)  # a row with nothing visible yet stays at 0
        weights = tl.exp(scores - shift[:, None])
        rescale = tl.exp(best - shift)
        # The weights multiply the values rounded to the values' dtype, as SDPA's fused kernels (flash, cuDNN) do:
        # its rounding, not a finer one, so that a decode step's output matches theirs to the last bit far more
        # often (a bit that moves can move a feature across the next top-K's cut-off). The sum stays unrounded.
        rounded = weights.to(v_ptr.dtype.element_ty).to(tl.float32)
        acc = acc * rescale[:, None] + tl.dot(rounded, v, input_precision="tf32")
        total = total * rescale + tl.sum(weights, axis=1)
        best = new_best
    if APPEND and STORE_LAST:
        _store_appended(k_base, v_base, new_k, new_v, at, split, length, stride_ks, stride_vs, dims, dim_ok,
                        BLOCK_S, BLOCKS_PER_SPLIT)
    out_ptrs = out_ptr + batch * stride_ob + heads[:, None] * stride_oh + dims[None, :]
    out_mask = row_ok[:, None] & dim_ok[None, :]
    if splits == 1:
        tl.store(out_ptrs, _finish(acc, total, at, length, APPEND).to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Every split writes its partial softmax (accumulator, maximum, sum); the last split of this key/value head
        # to arrive (an atomic ticket) merges them in split order -- the same order whichever program is last --
        # then re-arms the ticket for the next launch.
        slot = batch * tl.num_programs(0) + kv_head
        part_rows = (slot * splits + split) * GROUP_PAD + rows
        tl.store(part_ptr + part_rows[:, None] * BLOCK_D + dims[None, :], acc)
        tl.store(part_ptr + stat_offset + part_rows * 2, best)
        tl.store(part_ptr + stat_offset + part_rows * 2 + 1, total)
        tl.debug_barrier()
        ticket = tl.atomic_add(sem_ptr + slot, 1, sem="acq_rel")
        if ticket == splits - 1:
            best = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
            total = tl.zeros([GROUP_PAD], dtype=tl.float32)
            acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
            # (unrolled up to the most splits a launch takes: every split's loads in flight at once)
            for other in tl.static_range(MAX_SPLITS):
                there = other < splits
                other_rows = (slot * splits + other) * GROUP_PAD + rows
                other_best = tl.load(part_ptr + stat_offset + other_rows * 2, mask=there, other=float("-inf"),
                                     cache_modifier=".cg")
                other_total = tl.load(part_ptr + stat_offset + other_rows * 2 + 1, mask=there, other=0.0,
                                      cache_modifier=".cg")
                other_acc = tl.load(part_ptr + other_rows[:, None] * BLOCK_D + dims[None, :], mask=there, other=0.0,
                                    cache_modifier=".cg")
                new_best = tl.maximum(best, other_best)
                shift = tl.where(new_best == float("-inf"), 0.0, new_best)
                mine, theirs = tl.exp(best - shift), tl.exp(other_best - shift)
                acc = acc * mine[:, None] + other_acc * theirs[:, None]
                total = total * mine + other_total * theirs
                best = new_best
            tl.store(out_ptrs, _finish(acc, total, at, length, APPEND).to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(sem_ptr + slot, 0)


def check_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           mask: torch.Tensor | None) -> str | None:
    """Why `decode_attention` cannot take these arguments, or None when it can: one query token per sequence,
    bf16/fp16 throughout, key and value of one shape with a head size up to `MAX_HEAD_DIM`, query heads a multiple
    of the key/value heads, and a boolean mask of shape ``[batch or 1, 1, 1, positions]`` or none.

    Example:
        >>> q, kv = torch.zeros(1, 4, 1, 64, dtype=torch.bfloat16), torch.zeros(1, 2, 9, 64, dtype=torch.bfloat16)
        >>> check_decode_attention(q, kv, kv, None) is None, check_decode_attention(q.float(), kv, kv, None)
        (True, 'query, key and value must be bf16 or fp16 of one dtype')
    """
    if query.dim() != 4 or key.dim() != 4 or key.shape != value.shape:
        return "query, key and value must be [batch, heads, positions, head_dim], key and value of one shape"
    batch, heads, tokens, head_dim = query.shape
    if tokens != 1:
        return "one query token per sequence"
    if query.dtype not in (torch.bfloat16, torch.float16) or key.dtype != query.dtype or value.dtype != query.dtype:
        return "query, key and value must be bf16 or fp16 of one dtype"
    if key.shape[0] != batch or key.shape[-1] != head_dim or not 16 <= head_dim <= MAX_HEAD_DIM:
        return f"key/value batch and head size must match the query's, head size 16 to {MAX_HEAD_DIM}"
    if heads % key.shape[1] or key.shape[2] == 0:
        return "query heads must be a multiple of the key/value heads, with at least one cached position"
    if any(t.stride(-1) != 1 for t in (query, key, value)):
        return "query, key and value need unit stride along the head dimension"
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:3] != (1, 1)
                             or mask.shape[0] not in (1, batch) or mask.shape[-1] != key.shape[2]
                             or mask.stride(-1) != 1):
        return "the mask must be a boolean [batch or 1, 1, 1, positions] tensor (or None)"
    return None


def check_decode_append(query: torch.Tensor, new_key: torch.Tensor, new_value: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, count: torch.Tensor,
                        mask: torch.Tensor | None) -> str | None:
    """Why `decode_attention_append` cannot take these arguments, or None when it can: `check_decode_attention`'s
    conditions on the query, the caches and the mask; the new key and value ``[batch, kv_heads, 1, head_dim]``
    in the caches' dtype; cos and sin of one shape ``[batch or 1, 1, head_dim]`` (rotary over the whole head) and
    dtype, unit stride along it; an even head size; the count a one-element integer tensor on the caches' device.

    Example:
        >>> q, cache = torch.zeros(1, 4, 1, 64, dtype=torch.bfloat16), torch.zeros(1, 2, 9, 64, dtype=torch.bfloat16)
        >>> new, rotary, count = cache[:, :, :1], torch.ones(1, 1, 64, dtype=torch.bfloat16), torch.tensor(0)
        >>> check_decode_append(q, new, new, rotary, rotary, cache, cache, count, None) is None
        True
    """
    problem = check_decode_attention(query, key_cache, value_cache, mask)
    if problem is not None:
        return problem
    batch, kv_heads, _, head_dim = key_cache.shape
    if any(t.shape != (batch, kv_heads, 1, head_dim) or t.dtype != key_cache.dtype or t.stride(-1) != 1
           for t in (new_key, new_value)):
        return "the new key and value must be [batch, kv_heads, 1, head_dim] in the caches' dtype"
    if (cos.shape != sin.shape or cos.stride() != sin.stride() or cos.dim() != 3 or cos.shape[0] not in (1, batch)
            or cos.shape[1:] != (1, head_dim) or cos.stride(-1) != 1 or sin.dtype != cos.dtype
            or not cos.dtype.is_floating_point or head_dim % 2):
        return "cos and sin must be [batch or 1, 1, head_dim] of one dtype (rotary over the whole, even head)"
    if count.numel() != 1 or count.dtype not in (torch.int64, torch.int32) or count.device != key_cache.device:
        return "the count must be a one-element integer tensor on the caches' device"
    return None


_LAUNCHES: dict[tuple, KernelLaunch] = {}


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float | None = None) -> torch.Tensor:
    """``softmax(q kᵀ · scale + mask) v`` for one query token per sequence, grouped-query heads read in place.

    Args:
        query: ``[batch, heads, 1, head_dim]``, bf16/fp16, unit stride along ``head_dim``.
        key, value: ``[batch, kv_heads, positions, head_dim]`` (e.g. a static cache's buffers); ``heads`` a
            multiple of ``kv_heads``.
        mask: boolean ``[batch or 1, 1, 1, positions]`` (True: attend), or None to attend every position.
        scale: defaults to ``head_dim ** -0.5``.

    Returns ``[batch, 1, heads, head_dim]`` (the layout transformers' attention functions return). A sequence whose
    mask hides every position gets NaN: it has nothing to attend to.

    Example:
        >>> q = torch.randn(1, 8, 1, 64, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> kv = torch.randn(1, 2, 100, 64, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> decode_attention(q, kv, kv, None).shape  # doctest: +SKIP
        torch.Size([1, 1, 8, 64])
    """
    problem = check_decode_attention(query, key, value, mask)
    if problem is not None:
        raise ValueError(f"decode_attention: {problem}; got query {tuple(query.shape)} {query.dtype}, key "
                         f"{tuple(key.shape)} {key.dtype}, mask {None if mask is None else tuple(mask.shape)}")
    return _launch(query, key, value, mask, scale, None)


def decode_attention_append(query: torch.Tensor, new_key: torch.Tensor, new_value: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            count: torch.Tensor, mask: torch.Tensor | None,
                            scale: float | None = None) -> torch.Tensor:
    """A decode step's attention with the rotary embedding and the cache append in the same launch: what
    ``apply_rotary_pos_emb``, a static cache layer's ``update`` and `decode_attention` do one after the other.

    The query and the new key get ``x cos + rotate_half(x) sin``; the rotated key and the value are stored in the
    caches at position ``count`` (the number of positions filled, as transformers' ``StaticLayer`` counts them,
    the same for every sequence); the query attends to the caches with the new position included. A token past
    the caches' end is not stored and gets NaN. The count is only read: the caller advances it (as
    `ops.decode_attention_append` does).

    Args:
        query: ``[batch, heads, 1, head_dim]`` before rotary. new_key, new_value: ``[batch, kv_heads, 1,
            head_dim]``, the key before rotary. cos, sin: ``[batch or 1, 1, head_dim]`` (transformers' position
            embeddings of the step). key_cache, value_cache: ``[batch, kv_heads, positions, head_dim]``, written in
            place. count: one-element integer tensor (read). mask, scale: as `decode_attention`'s.

    Returns ``[batch, 1, heads, head_dim]``.

    Example:
        >>> out = decode_attention_append(q, k, v, cos, sin, layer.keys, layer.values, layer.cumulative_length,
        ...                               mask, module.scaling)  # doctest: +SKIP
    """
    problem = check_decode_append(query, new_key, new_value, cos, sin, key_cache, value_cache, count, mask)
    if problem is not None:
        raise ValueError(f"decode_attention_append: {problem}; got query {tuple(query.shape)}, new key "
                         f"{tuple(new_key.shape)}, cos {tuple(cos.shape)} {cos.dtype}, cache {tuple(key_cache.shape)}, "
                         f"count {tuple(count.shape)} {count.dtype}")
    return _launch(query, key_cache, value_cache, mask, scale, (new_key, new_value, cos, sin, count))


def _prefetches() -> bool:
    """Whether launches ask L2 for their cached keys and values before their wait (`kernels.ATTENTION_PREFETCH`,
    with programmatic dependent launch: without it nothing runs before the kernel ahead has finished)."""
    from qsparse_hf import kernels

    return kernels.ATTENTION_PREFETCH and pdl_enabled()


def _launch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
            scale: float | None, append: tuple | None) -> torch.Tensor:
    """One launch of the kernel (``append``: `decode_attention_append`'s new key, value, cos, sin and count)."""
    batch, heads, _, head_dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    group = heads // kv_heads
    blocks = _cdiv(length, _BLOCK_S)
    splits = min(_cdiv(blocks, _MIN_BLOCKS_PER_SPLIT), _MAX_SPLITS, max(1, _TARGET_PROGRAMS // (batch * kv_heads)))
    # a power of two, so that a growing cache compiles a new kernel only when its length doubles
    blocks_per_split = 1 << (_cdiv(blocks, splits) - 1).bit_length()
    splits = _cdiv(blocks, blocks_per_split)  # no split left without a block
    group_pad = max(16, 1 << (group - 1).bit_length())  # tl.dot takes at least 16 rows
    block_d = 1 << (head_dim - 1).bit_length()
    out = torch.empty(batch, 1, heads, head_dim, dtype=query.dtype, device=query.device)
    stat_offset = batch * kv_heads * splits * group_pad * block_d
    # (a one-split launch touches neither, but the kernel is compiled for any split count: same pointer types)
    partials = _scratch(query.device, stat_offset + batch * kv_heads * splits * group_pad * 2)
    tickets = _semaphores(query.device, batch * kv_heads)  # one per key/value head
    prefetch = _prefetches()
    constants = (group, group_pad, head_dim, block_d, blocks_per_split, mask is not None, append is not None,
                 _BLOCK_S, _NUM_WARPS, prefetch, _SKIP_HIDDEN, _STORE_LAST)
    launch = _LAUNCHES.get(constants)
    if launch is None:
        # (integer scalars keyed by class: a growing cache changes its length and strides at every step)
        launch = _LAUNCHES[constants] = KernelLaunch(_decode_attention_kernel, dict(
            GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=_BLOCK_S,
            BLOCKS_PER_SPLIT=blocks_per_split, MAX_SPLITS=_MAX_SPLITS, HAS_MASK=mask is not None,
            APPEND=append is not None, PRECISE=_PRECISE, num_warps=_NUM_WARPS, PREFETCH=prefetch,
            SKIP_HIDDEN=_SKIP_HIDDEN, STORE_LAST=_STORE_LAST,
            **pdl_constants()),
            scalars_by_class=True)
    mask_batch_stride = 0 if mask is None or mask.shape[0] == 1 else mask.stride(0)
    new_key, new_value, cos, sin, count = append or (query,) * 5
    launch(
        (kv_heads, splits, batch),
        (query, key, value, query if mask is None else mask, out, partials, tickets, new_key, new_value, cos, sin,
         count),
        (length, float(head_dim ** -0.5 if scale is None else scale), query.stride(0),
         query.stride(1), key.stride(0), key.stride(1), key.stride(2), value.stride(0), value.stride(1),
         value.stride(2), mask_batch_stride, out.stride(0), out.stride(2), stat_offset, new_key.stride(0),
         new_key.stride(1), new_value.stride(0), new_value.stride(1), 0 if cos.shape[0] == 1 else cos.stride(0)),
    )
    return out
