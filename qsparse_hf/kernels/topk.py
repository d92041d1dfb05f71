"""Exact top-K of ``|x|`` per row in one pass over the row: a two-level radix select in a Triton program.

``torch.topk`` sorts and ``torch.kthvalue`` selects, but both launch several kernels and touch the row many times.
Here one program owns one row: it reads it once into registers, finds the K-th largest magnitude from the
magnitude's bit pattern (a radix select with two digits: two histograms in registers, no sorting), keeps ties at
the threshold in index order (exactly K survive, the same mask as `qsparse_hf.functional.topk_mask`) and writes the
sparse row -- and, for the decode GEMV, the K kept indices in ascending order. NaN ranks as infinity (so it is kept and propagates, as through a dense matmul). When asked, the program
also adds the zeros it wrote to an int64 counter (one atomic per row), so measuring sparsity costs no extra kernel.

bf16 and fp16 only: their magnitudes are 15-bit patterns whose integer order is the float order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["topk_sparsify_rows"]


@triton.jit
def _kth_largest_key(key, valid, k):
    """The k-th largest of the non-negative 15-bit keys where ``valid``: two histograms instead of fifteen counting
    passes. The first over the top 8 bits finds the bin that holds the k-th key, the second over the low 7 bits of
    the keys in that bin finds the key itself (a two-digit radix select; each histogram is one pass in registers)."""
    high = key >> 7
    counts = tl.histogram(high, 256, mask=valid)
    # at_or_above[b]: keys whose high digit is >= b (non-increasing in b); the k-th largest lies in the last bin
    # where it is still >= k.
    below = tl.cumsum(counts, 0) - counts
    at_or_above = tl.sum(counts, 0) - below
    digit = tl.sum((at_or_above >= k).to(tl.int32), 0) - 1
    bins = tl.arange(0, 256)
    above = tl.sum(tl.where(bins > digit, counts, 0), 0)
    low_counts = tl.histogram(key & 127, 128, mask=valid & (high == digit))
    low_below = tl.cumsum(low_counts, 0) - low_counts
    low_at_or_above = tl.sum(low_counts, 0) - low_below
    low_digit = tl.sum((low_at_or_above >= k - above).to(tl.int32), 0) - 1
    return digit * 128 + low_digit


@triton.jit
def _topk_rows_kernel(x_ptr, out_ptr, zeros_ptr, index_ptr, dim, k, stride_x, stride_out, INF_KEY: tl.constexpr,
                      BLOCK: tl.constexpr, COUNT_ZEROS: tl.constexpr, WRITE_INDICES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    valid = offs < dim
    x = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=0.0)
    # Magnitude bits. Every NaN pattern lies above infinity's: clamp them to it, so NaN ranks as inf (ties by
    # index), as in the reference.
    key = tl.minimum(x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF, INF_KEY)
    threshold = _kth_largest_key(key, valid, k)
    greater = key > threshold
    ties_kept = k - tl.sum(greater.to(tl.int32), 0)
    at_threshold = (key == threshold) & valid
    keep = greater | (at_threshold & (tl.cumsum(at_threshold.to(tl.int32), 0) <= ties_kept))
    tl.store(out_ptr + row * stride_out + offs, tl.where(keep, x, 0.0), mask=valid)
    if WRITE_INDICES:
        # The kept features in ascending order, exactly k of them: what the gathering GEMV reads.
        slot = tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(index_ptr + row * k + slot, offs, mask=keep)
    if COUNT_ZEROS:
        nonzero = tl.sum((keep & (x != 0)).to(tl.int32), 0)
        tl.atomic_add(zeros_ptr, (dim - nonzero).to(tl.int64))


def _num_warps(block: int) -> int:
    return max(4, min(16, block // 1024))


_INF_KEY = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def topk_sparsify_rows(x: torch.Tensor, k: int, zeros: torch.Tensor | None = None, *,
                       indices: bool = False):
    """Zero all but the ``k`` largest ``|x|`` of every row (last dimension) of a bf16/fp16 tensor.

    Same result as ``x * functional.topk_mask(x, k)``, bit for bit (ties at the threshold kept lowest index first,
    NaN ranked as infinity). With ``zeros`` (an int64 scalar tensor on the same device) the number of zeros written
    is added to it in the same launch. With ``indices=True`` the result is ``(sparse, kept)``: ``kept`` is an int32
    ``[rows, k]`` tensor of the kept positions of each row, ascending (rows = all leading dimensions flattened).

    Example:
        >>> import os; os.environ.setdefault("TRITON_INTERPRET", "1")  # doctest: +SKIP
        >>> topk_sparsify_rows(torch.tensor([[0.5, -2.0, 1.0, 0.1]], dtype=torch.bfloat16), 2)  # doctest: +SKIP
        tensor([[ 0., -2.,  1.,  0.]], dtype=torch.bfloat16)
    """
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"topk_sparsify_rows takes bf16 or fp16, got {x.dtype}")
    dim = x.shape[-1]
    if not 1 <= k <= dim:
        raise ValueError(f"k must be in [1, {dim}], got {k}")
    rows = x.reshape(-1, dim)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty_like(rows)
    kept = torch.empty(rows.shape[0], k, dtype=torch.int32, device=x.device) if indices else None
    if rows.shape[0]:
        block = triton.next_power_of_2(dim)
        _topk_rows_kernel[(rows.shape[0],)](
            rows, out, rows if zeros is None else zeros, out if kept is None else kept, dim, k, rows.stride(0),
            out.stride(0), INF_KEY=_INF_KEY[x.dtype], BLOCK=block, COUNT_ZEROS=zeros is not None,
            WRITE_INDICES=indices, num_warps=_num_warps(block)
        )
    out = out.reshape(x.shape)
    return (out, kept) if indices else out
