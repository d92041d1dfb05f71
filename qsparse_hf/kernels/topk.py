"""Exact top-K of ``|x|`` per row in one pass over the row: a two-level radix select in a Triton program.

``torch.topk`` sorts and ``torch.kthvalue`` selects, but both launch several kernels and touch the row many times.
Here one program owns one row: it reads it once into registers, finds the K-th largest magnitude bit by bit from
the magnitude's bit pattern (a radix select: fifteen counting passes over registers, no sorting), keeps ties at the
threshold in index order (exactly K survive, the same mask as `qsparse_hf.functional.topk_mask`) and writes the
sparse row. NaN ranks as infinity (so it is kept and propagates, as through a dense matmul). When asked, the program
also adds the zeros it wrote to an int64 counter (one atomic per row), so measuring sparsity costs no extra kernel.

bf16 and fp16 only: their magnitudes are 15-bit patterns whose integer order is the float order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["topk_sparsify_rows"]


@triton.jit
def _kth_largest_key(key, k):
    """The k-th largest of non-negative 15-bit keys, built bit by bit from the top: keep a bit when at least k keys
    are >= the prefix with that bit set. Fifteen counting passes over the row, all in registers."""
    prefix = 0
    for bit in tl.static_range(14, -1, -1):
        candidate = prefix | (1 << bit)
        count = tl.sum((key >= candidate).to(tl.int32), 0)
        prefix = tl.where(count >= k, candidate, prefix)
    return prefix


@triton.jit
def _topk_rows_kernel(x_ptr, out_ptr, zeros_ptr, dim, k, stride_x, stride_out, INF_KEY: tl.constexpr,
                      BLOCK: tl.constexpr, COUNT_ZEROS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    valid = offs < dim
    x = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=0.0)
    # Magnitude bits; padding reads as 0.0 and sits after every real index, so ties never pick it. Every NaN
    # pattern lies above infinity's: clamp them to it, so NaN ranks as inf (ties by index), as in the reference.
    key = tl.minimum(x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF, INF_KEY)
    threshold = _kth_largest_key(key, k)
    greater = key > threshold
    ties_kept = k - tl.sum(greater.to(tl.int32), 0)
    at_threshold = key == threshold
    keep = greater | (at_threshold & (tl.cumsum(at_threshold.to(tl.int32), 0) <= ties_kept))
    tl.store(out_ptr + row * stride_out + offs, tl.where(keep, x, 0.0), mask=valid)
    if COUNT_ZEROS:
        nonzero = tl.sum((keep & (x != 0)).to(tl.int32), 0)
        tl.atomic_add(zeros_ptr, (dim - nonzero).to(tl.int64))


def _num_warps(block: int) -> int:
    return max(4, min(16, block // 1024))


_INF_KEY = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def topk_sparsify_rows(x: torch.Tensor, k: int, zeros: torch.Tensor | None = None) -> torch.Tensor:
    """Zero all but the ``k`` largest ``|x|`` of every row (last dimension) of a bf16/fp16 tensor.

    Same result as ``x * functional.topk_mask(x, k)``, bit for bit (ties at the threshold kept lowest index first,
    NaN ranked as infinity). With ``zeros`` (an int64 scalar tensor on the same device) the number of zeros written
    is added to it in the same launch.

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
    if rows.shape[0]:
        block = triton.next_power_of_2(dim)
        _topk_rows_kernel[(rows.shape[0],)](
            rows, out, rows if zeros is None else zeros, dim, k, rows.stride(0), out.stride(0),
            INF_KEY=_INF_KEY[x.dtype], BLOCK=block, COUNT_ZEROS=zeros is not None, num_warps=_num_warps(block)
        )
    return out.reshape(x.shape)
