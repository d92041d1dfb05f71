"""Pure tensor math of Q-Sparse: top-K masks, the straight-through estimator and the BitNet b1.58 quantizers.

Nothing here knows about modules or models: every function takes tensors and returns tensors, and is the reference
that the layers, the kernels and the tests are checked against.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = [
    "keep_count",
    "topk_mask",
    "block_topk_mask",
    "straight_through",
    "sparsify",
    "relu2",
    "absmax_quantize",
    "ternary_codes",
    "ternary_quantize",
]

# Absorbs float error in `ratio * dim` (0.29 * 100 == 28.999999999999996) before flooring.
_ROUNDING_SLACK = 1e-6


def keep_count(topk: float | int, dim: int) -> int:
    """Number of entries kept out of ``dim`` for a ``topk`` setting.

    A float ``topk`` in (0, 1] is a fraction of ``dim``: ``K = max(1, floor(topk * dim))`` (floored, as in the
    paper's reference code, with a 1e-6 slack against float error). An int ``topk`` is ``K`` itself, capped at
    ``dim``.

    Example:
        >>> keep_count(0.7, 4096), keep_count(0.5, 7), keep_count(64, 4096), keep_count(1.0, 10)
        (2867, 3, 64, 10)
    """
    if isinstance(topk, bool) or not isinstance(topk, (int, float)):
        raise TypeError(f"topk must be a float in (0, 1] or an int >= 2, got {topk!r}")
    if isinstance(topk, int):
        return min(topk, dim)
    return max(1, min(dim, math.floor(topk * dim + _ROUNDING_SLACK)))


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest ``|x|`` along the last dimension, exactly ``k`` per row.

    Ties at the threshold are broken deterministically in favour of the lowest index, so bf16/fp16 inputs with
    many equal magnitudes still keep exactly ``k`` entries and give the same mask on every run and device. NaN
    ranks as infinity: it is kept (and so propagates through the next matmul, as it would in the dense model), and
    a row with at least ``k`` finite entries still keeps exactly ``k``.

    Example:
        >>> topk_mask(torch.tensor([[0.1, -3.0, 2.0, 2.0]]), 2)
        tensor([[False,  True,  True, False]])
        >>> topk_mask(torch.tensor([[1.0, float("nan"), 3.0, 2.0]]), 2)
        tensor([[False,  True,  True, False]])
    """
    dim = x.shape[-1]
    if k >= dim:
        return torch.ones_like(x, dtype=torch.bool)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    # Comparisons with NaN are all False, which would drop it and keep fewer than k: rank it as +inf instead.
    magnitude = torch.nan_to_num(x.abs(), nan=math.inf, posinf=math.inf)
    # The k-th largest value is the (dim - k + 1)-th smallest: a selection, not a sort.
    threshold = magnitude.kthvalue(dim - k + 1, dim=-1, keepdim=True).values
    above = magnitude > threshold
    at_threshold = magnitude == threshold
    still_needed = k - above.sum(dim=-1, keepdim=True)
    return above | (at_threshold & (at_threshold.cumsum(dim=-1) <= still_needed))


def block_topk_mask(x: torch.Tensor, n: int, block_size: int) -> torch.Tensor:
    """Block (N:M) top-K mask: keep the ``n`` largest ``|x|`` in every block of ``block_size`` consecutive features.

    This is the batch-friendly variant (Block Q-Sparse): every block keeps the same count, which suits
    tensor-core N:M kernels and batched serving. The last dimension must be a multiple of ``block_size``.

    Example:
        >>> block_topk_mask(torch.tensor([[1.0, 4.0, 3.0, 2.0]]), n=1, block_size=2)
        tensor([[False,  True,  True, False]])
    """
    dim = x.shape[-1]
    if dim % block_size:
        raise ValueError(f"the feature dimension {dim} is not a multiple of block_size={block_size}")
    blocks = x.reshape(*x.shape[:-1], dim // block_size, block_size)
    return topk_mask(blocks, n).reshape(x.shape)


class _StraightThrough(torch.autograd.Function):
    """y = fn(x) in the forward pass; dL/dx = dL/dy in the backward pass (nothing is saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return fn(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None


def straight_through(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a non-differentiable ``fn`` with the straight-through estimator: the gradient reaches ``x`` unchanged.

    Example:
        >>> x = torch.tensor([1.4, -0.6], requires_grad=True)
        >>> straight_through(torch.round, x).sum().backward(); x.grad
        tensor([1., 1.])
    """
    return _StraightThrough.apply(x, fn)


def sparsify(
    x: torch.Tensor,
    k: int,
    *,
    block_size: int | None = None,
    ste: bool = True,
    rescale: bool = False,
) -> torch.Tensor:
    """Keep the top-``k`` entries of ``|x|`` per token (last dimension) and zero the rest.

    Args:
        x: activations of any leading shape, features last.
        k: entries kept per token, or per block when ``block_size`` is given.
        block_size: Block Q-Sparse: keep ``k`` entries in each block of this many consecutive features.
        ste: straight-through estimator. True (the paper's method): the gradient reaches every entry of ``x``,
            masked or not. False (for ablations): masked entries get zero gradient.
        rescale: multiply the kept entries by ``||x||₂ / ||x̃||₂`` per token so the sparse vector keeps the dense
            vector's L2 norm (the paper's text mentions a norm re-scaling; its reference code has none). The factor
            is treated as a constant in the backward pass.

    Example:
        >>> sparsify(torch.tensor([[0.5, -2.0, 1.0, 0.1]]), k=2)
        tensor([[ 0., -2.,  1.,  0.]])
    """
    dim = x.shape[-1]
    if block_size is None and k >= dim:
        return x
    if block_size is not None and k >= block_size:
        return x
    mask = topk_mask(x, k) if block_size is None else block_topk_mask(x, k, block_size)

    def apply_mask(t: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, t, torch.zeros((), dtype=t.dtype, device=t.device))

    out = straight_through(apply_mask, x) if ste else apply_mask(x)
    if rescale:
        with torch.no_grad():
            dense_norm = x.float().norm(dim=-1, keepdim=True)
            sparse_norm = out.float().norm(dim=-1, keepdim=True)
            factor = (dense_norm / sparse_norm.clamp_min(torch.finfo(torch.float32).tiny)).to(x.dtype)
        out = out * factor
    return out


def relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU, ``max(x, 0)²``: the FFN activation Q-Sparse uses when training from scratch.

    Example:
        >>> relu2(torch.tensor([-1.0, 0.5, 2.0]))
        tensor([0.0000, 0.2500, 4.0000])
    """
    return torch.relu(x).square()


def absmax_quantize(x: torch.Tensor, bits: int = 8, eps: float = 1e-5, ste: bool = True) -> torch.Tensor:
    """Per-token absmax fake-quantization of activations (BitNet b1.58 convention).

    ``γ = max|x|`` per token, ``q = RoundClip(x · Qb/γ, −Qb−1, Qb)`` with ``Qb = 2^(bits−1) − 1``, and the result is
    returned de-quantized (``q · γ/Qb``) in the input dtype, so every value lies on the token's ``bits``-bit grid.
    The gradient passes straight through when ``ste`` is True.

    Example:
        >>> absmax_quantize(torch.tensor([[1.0, -0.5, 0.01]])) * 127
        tensor([[127., -64.,   1.]])
    """
    qmax = 2 ** (bits - 1) - 1

    def quantize(t: torch.Tensor) -> torch.Tensor:
        scale = qmax / t.float().abs().amax(dim=-1, keepdim=True).clamp_min(eps)
        return ((t.float() * scale).round().clamp(-qmax - 1, qmax) / scale).to(t.dtype)

    return straight_through(quantize, x) if ste else quantize(x)


def ternary_quantize(weight: torch.Tensor, eps: float = 1e-5, ste: bool = True) -> torch.Tensor:
    """BitNet b1.58 ternary fake-quantization of a weight: ``α · RoundClip(W / (α + ε), −1, 1)``, ``α = mean|W|``.

    Every entry of the result is one of ``{−α, 0, α}``; the gradient passes straight through to the full-precision
    master weight when ``ste`` is True.

    Example:
        >>> ternary_quantize(torch.tensor([[0.9, 0.1, -1.2, 0.4]]))
        tensor([[ 0.6500,  0.0000, -0.6500,  0.6500]])
    """

    def quantize(w: torch.Tensor) -> torch.Tensor:
        codes, alpha = ternary_codes(w, eps)
        return (codes.float() * alpha).to(w.dtype)

    return straight_through(quantize, weight) if ste else quantize(weight)


def ternary_codes(weight: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes ``RoundClip(W / (α + ε), −1, 1)`` as int8 and the fp32 scale ``α = mean|W|``.

    ``(codes.float() * α).to(W.dtype)`` is exactly `ternary_quantize`'s output, so packed exports reload bit for bit.

    Example:
        >>> ternary_codes(torch.tensor([[0.9, 0.1, -1.2, 0.4]]))
        (tensor([[ 1,  0, -1,  1]], dtype=torch.int8), tensor(0.6500))
    """
    alpha = weight.float().abs().mean()
    return (weight.float() / (alpha + eps)).round().clamp(-1, 1).to(torch.int8), alpha
