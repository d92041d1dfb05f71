"""The kernels as PyTorch custom ops (``torch.ops.qsparse.*``), so ``torch.compile`` and CUDA graphs see one opaque,
shape-known node each instead of tracing into Triton launches, and autograd sees the straight-through estimator.

- ``qsparse::topk_sparsify(x, k)``: exact top-K of ``|x|`` per row; backward passes the gradient straight through.
- ``qsparse::topk_select(x, k, hint_slot)``: the same sparse tensor and the kept positions of each row (inference
  only); ``hint_slot`` >= 0 names a threshold hint registered with `register_hint` (-1: none).
- ``qsparse::silu_select(gate, up, k, hint_slot)``: `topk_select` of ``F.silu(gate)``, times ``up`` when given: a
  gated FFN's activation, split over many programs per row where a hint serves it (inference only).
- ``qsparse::norm_select(hidden, residual, weight, eps, k, hint_slot)``: a decoder layer's residual add and RMSNorm
  and the `topk_select` of the normed row in one launch (`topk.norm_topk_rows`; inference).
- ``qsparse::sparse_linear(x, weight_t, bias, kept)``: ``x @ weight_t + bias`` reading only the weight rows of
  non-zero inputs (or exactly the ``kept`` rows of one token), for at most `MAX_DECODE_TOKENS` tokens (inference).
- ``qsparse::sparse_linear_block(x, weight, bias, kept, column, bias_column, width, guide, hint_slot,
  guide_silu)``: the same product over the side-by-side block that one member's ``weight`` (and ``bias``)
  Parameter is a view of (`block_of`), so that a compiled step reads only Parameters, whose guards Dynamo skips
  while their module is unchanged, rather than the block itself, whose guards it evaluates before every call
  (``guide``, ``hint_slot``, ``guide_silu``: `sparse_linear_block`'s L2 prefetch).
- ``qsparse::gated_select(x, kept, weight, gate_column, up_column, width, inter, k, hint_slot)``: a gated FFN's
  activation and its top-K, resolved in the gate/up GEMV over the block ``weight`` views (`ffn.gated_select`).
- ``qsparse::masked_linear_block(values, keys, state, weight, bias, column, bias_column, width)``: down's GEMV
  applying that top-K as it reads (`gemv.masked_gemv`), over the block ``weight`` views.
- ``qsparse::gated_select_listed(...)``: `gated_select`'s arguments; the sparse activation times up and its kept
  features' list, as the split selection writes them (`ffn.gated_select_listed`).
- ``qsparse::decode_attention(query, key, value, mask, scale)``: one-token attention over the key/value cache in one
  launch (`attention.decode_attention`; inference).
- ``qsparse::step_input(x)``: a copy of ``x``, so that a compiled step holds one buffer of a tensor that every
  decoder layer reads (the attention mask) instead of one the compiler computes again for each layer's custom op.
- ``qsparse::decode_attention_append(query, new_key, new_value, cos, sin, key_cache, value_cache, count, mask,
  scale)``: the same with the step's rotary embedding and static-cache append in the launch
  (`attention.decode_attention_append`; mutates the caches and reads the count, which the wrapper then advances
  with ``add_``; inference).

In eager mode the public wrappers below launch the kernels directly instead: the dispatcher's per-call cost would
otherwise be a large share of an eager decode step.
"""

from __future__ import annotations

from typing import Optional

import torch

from .attention import decode_attention as _decode_attention_launch
from .attention import decode_attention_append as _decode_attention_append_launch
from .ffn import gated_select as _gated_select_launch
from .ffn import gated_select_listed as _gated_select_listed_launch
from .gemv import MAX_DECODE_TOKENS, masked_gemv, repeat_launch, select_gemv, sparse_gemv
from .topk import launch_config, norm_topk_rows, repeat_row_launch, silu_topk_rows, topk_sparsify_rows

__all__ = ["topk_sparsify", "topk_select", "silu_select", "norm_select", "sparse_linear", "sparse_linear_block",
           "select_linear", "gated_select", "gated_select_listed", "masked_linear_block", "decode_attention",
           "register_hint", "block_of", "repeatable_linear", "repeatable_select", "step_input"]

# Threshold hints (`topk.new_hint`) by slot. The op takes the slot number, not the tensor: the kernel updates the
# hint in place, which a compiled graph must not see as a mutated input (CUDA graphs would copy it in afresh each
# replay). A hint, once registered, lives as long as the process, since captured graphs keep its address.
_HINTS: list[torch.Tensor] = []


def register_hint(hint: torch.Tensor) -> int:
    """Keep ``hint`` (from `topk.new_hint`) for `topk_select` under ``torch.compile``; returns its slot.

    Example:
        >>> from qsparse_hf.kernels.topk import new_hint
        >>> slot = register_hint(new_hint("cpu", 8)); slot >= 0
        True
    """
    _HINTS.append(hint)
    return len(_HINTS) - 1


def _hint_for(slot: int, x: torch.Tensor) -> torch.Tensor | None:
    """The hint in ``slot`` if it serves ``x`` (same device, an entry per row), else None (then no hint is used)."""
    if slot < 0:
        return None
    hint = _HINTS[slot]
    return hint if hint.device == x.device and hint.numel() >= x.numel() // x.shape[-1] else None


@torch.library.custom_op("qsparse::topk_sparsify", mutates_args=())
def _topk_sparsify(x: torch.Tensor, k: int) -> torch.Tensor:
    return topk_sparsify_rows(x, k)


@_topk_sparsify.register_fake
def _(x, k):
    return torch.empty_like(x)


def _topk_setup(ctx, inputs, output):
    pass


def _topk_backward(ctx, grad):
    return grad, None  # straight-through: every entry of the dense input gets the gradient


_topk_sparsify.register_autograd(_topk_backward, setup_context=_topk_setup)


@torch.library.custom_op("qsparse::topk_select", mutates_args=())
def _topk_select(x: torch.Tensor, k: int, hint_slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    return topk_sparsify_rows(x, k, indices=True, hint=_hint_for(hint_slot, x))


@_topk_select.register_fake
def _(x, k, hint_slot):
    return torch.empty_like(x), x.new_empty(x.numel() // x.shape[-1], k, dtype=torch.int32)


def _silu_select_rows(gate: torch.Tensor, up: torch.Tensor | None, k: int, hint_slot: int,
                      zeros: torch.Tensor | None = None):
    """`silu_select` of a step that waits on GPU time (compiled or captured): wide hinted rows split over many
    programs, SiLU computed by each for its part, rather than the one-program launch (letting down's GEMV start
    during its counting launch where that GEMV prefetches, `kernels.GEMV_PREFETCH_DOWN`)."""
    from qsparse_hf import kernels

    hint = _hint_for(hint_slot, gate)
    # the plain selection's default where it splits the row (`launch_config` keeps SiLU in one program: eager)
    split = launch_config(1 << (gate.shape[-1] - 1).bit_length(), hinted=hint is not None, dtype=gate.dtype)
    config = split if split[0] == "split" else None
    early = config is not None and kernels.prefetches_down()
    return silu_topk_rows(gate, k, up, zeros, indices=True, hint=hint, config=config, early_dependents=early)


@torch.library.custom_op("qsparse::silu_select", mutates_args=())
def _silu_select(gate: torch.Tensor, up: Optional[torch.Tensor], k: int,
                 hint_slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _silu_select_rows(gate, up, k, hint_slot)


@_silu_select.register_fake
def _(gate, up, k, hint_slot):
    return torch.empty_like(gate), gate.new_empty(gate.numel() // gate.shape[-1], k, dtype=torch.int32)


@torch.library.custom_op("qsparse::sparse_linear", mutates_args=())
def _sparse_linear(x: torch.Tensor, weight_t: torch.Tensor, bias: Optional[torch.Tensor],
                   kept: Optional[torch.Tensor]) -> torch.Tensor:
    return sparse_gemv(x, weight_t, bias, kept=kept)


@_sparse_linear.register_fake
def _(x, weight_t, bias, kept):
    return x.new_empty(*x.shape[:-1], weight_t.shape[1])


def block_of(member: torch.Tensor, column: int, width: int) -> torch.Tensor:
    """The ``[in_features, width]`` side-by-side block that ``member`` -- a linear's ``[out, in]`` weight stored as
    the block's columns ``column : column + out`` (or a bias: its entries ``column : column + out``) -- is a view of.

    Example:
        >>> block = torch.arange(12.0).reshape(3, 4)   # in_features 3, two members of widths 1 and 3
        >>> second = block[:, 1:4].t()
        >>> torch.equal(block_of(second, 1, 4), block)
        True
    """
    if member.dim() == 1:
        if member.stride(0) != 1 or member.storage_offset() < column:
            raise ValueError("the bias is not a view of a side-by-side bias (prepare_for_decode lays it out)")
        return member.as_strided((width,), (1,), member.storage_offset() - column)
    if member.stride() != (1, width) or member.storage_offset() < column:
        raise ValueError(f"the weight (strides {member.stride()}) is not a view of a side-by-side block of width "
                         f"{width} (prepare_for_decode lays it out)")
    return member.as_strided((member.shape[1], width), (width, 1), member.storage_offset() - column)


def _gemv_through(x, weight, bias, kept, column: int, bias_column: int, width: int,
                  guide: torch.Tensor | None = None, hint_slot: int = -1, guide_silu: bool = False) -> torch.Tensor:
    block_bias = None if bias is None else block_of(bias, bias_column, width)
    hint = None if guide is None else _hint_for(hint_slot, guide)
    return sparse_gemv(x, block_of(weight, column, width), block_bias, kept=kept, guide=guide, hint=hint,
                       guide_silu=guide_silu)


@torch.library.custom_op("qsparse::sparse_linear_block", mutates_args=())
def _sparse_linear_block(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         kept: Optional[torch.Tensor], column: int, bias_column: int, width: int,
                         guide: Optional[torch.Tensor] = None, hint_slot: int = -1,
                         guide_silu: bool = False) -> torch.Tensor:
    return _gemv_through(x, weight, bias, kept, column, bias_column, width, guide, hint_slot, guide_silu)


@_sparse_linear_block.register_fake
def _(x, weight, bias, kept, column, bias_column, width, guide=None, hint_slot=-1, guide_silu=False):
    return x.new_empty(*x.shape[:-1], width)


def _gated_through(x, kept, weight, gate_column: int, up_column: int, width: int, inter: int, k: int,
                   hint_slot: int, listed: bool = False):
    launch = _gated_select_listed_launch if listed else _gated_select_launch
    return launch(x, kept, block_of(weight, gate_column, width), gate_column, up_column, inter, k,
                  _hint_for(hint_slot, x))


@torch.library.custom_op("qsparse::gated_select", mutates_args=())
def _gated_select(x: torch.Tensor, kept: Optional[torch.Tensor], weight: torch.Tensor, gate_column: int,
                  up_column: int, width: int, inter: int, k: int,
                  hint_slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _gated_through(x, kept, weight, gate_column, up_column, width, inter, k, hint_slot)


@_gated_select.register_fake
def _(x, kept, weight, gate_column, up_column, width, inter, k, hint_slot):
    act = x.new_empty(*x.shape[:-1], inter)
    return act, torch.empty_like(act), x.new_empty(2, dtype=torch.int32)


@torch.library.custom_op("qsparse::gated_select_listed", mutates_args=())
def _gated_select_listed(x: torch.Tensor, kept: Optional[torch.Tensor], weight: torch.Tensor, gate_column: int,
                         up_column: int, width: int, inter: int, k: int,
                         hint_slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _gated_through(x, kept, weight, gate_column, up_column, width, inter, k, hint_slot, listed=True)


@_gated_select_listed.register_fake
def _(x, kept, weight, gate_column, up_column, width, inter, k, hint_slot):
    return x.new_empty(*x.shape[:-1], inter), x.new_empty(1, k, dtype=torch.int32)


def _masked_through(values, keys, state, weight, bias, column: int, bias_column: int, width: int) -> torch.Tensor:
    block_bias = None if bias is None else block_of(bias, bias_column, width)
    return masked_gemv(values, keys, state, block_of(weight, column, width), block_bias)


@torch.library.custom_op("qsparse::masked_linear_block", mutates_args=())
def _masked_linear_block(values: torch.Tensor, keys: torch.Tensor, state: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor], column: int, bias_column: int, width: int) -> torch.Tensor:
    return _masked_through(values, keys, state, weight, bias, column, bias_column, width)


@_masked_linear_block.register_fake
def _(values, keys, state, weight, bias, column, bias_column, width):
    return values.new_empty(*values.shape[:-1], width)


@torch.library.custom_op("qsparse::decode_attention", mutates_args=())
def _decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
                      scale: Optional[float]) -> torch.Tensor:
    return _decode_attention_launch(query, key, value, mask, scale)


@_decode_attention.register_fake
def _(query, key, value, mask, scale):
    batch, heads, _, head_dim = query.shape
    return query.new_empty(batch, 1, heads, head_dim)


@torch.library.custom_op("qsparse::step_input", mutates_args=())
def _step_input(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_step_input.register_fake
def _(x):
    return torch.empty_like(x)


def step_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` as one buffer of a compiled step that every decoder layer reads (``qsparse::step_input``, a copy);
    ``x`` itself outside compilation.

    Inductor hands each custom op a buffer of its own for an input that a fused pointwise kernel computes: a
    one-token step's attention mask (``kv_index <= position``), passed to every layer's `decode_attention_append`,
    was computed again before each of them, one launch a layer. The output of an opaque op is a buffer the compiler
    cannot recompute, so the layers share it.

    Example:
        >>> step_input(torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    return _step_input(x) if torch.compiler.is_compiling() else x


@torch.library.custom_op("qsparse::decode_attention_append", mutates_args=("key_cache", "value_cache"))
def _decode_attention_append(query: torch.Tensor, new_key: torch.Tensor, new_value: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                             count: torch.Tensor, mask: Optional[torch.Tensor], scale: Optional[float]) -> torch.Tensor:
    return _decode_attention_append_launch(query, new_key, new_value, cos, sin, key_cache, value_cache, count, mask,
                                           scale)


@_decode_attention_append.register_fake
def _(query, new_key, new_value, cos, sin, key_cache, value_cache, count, mask, scale):
    batch, heads, _, head_dim = query.shape
    return query.new_empty(batch, 1, heads, head_dim)


class _TopKStraightThrough(torch.autograd.Function):
    """Eager training: the kernel forward (counting zeros on the way), the straight-through backward."""

    @staticmethod
    def forward(ctx, x, k, zeros):
        return topk_sparsify_rows(x, k, zeros)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def topk_sparsify(x: torch.Tensor, k: int, zeros: torch.Tensor | None = None) -> torch.Tensor:
    """Top-K of ``|x|`` per token through the Triton kernel, with the straight-through gradient.

    Under ``torch.compile`` this is the ``qsparse::topk_sparsify`` op; in eager mode the kernel is launched
    directly (no dispatcher round trip: eager decode is bound by per-call overhead), and ``zeros`` (an int64
    scalar tensor) receives the count of zeros written.

    Example:
        >>> x = torch.tensor([[0.5, -2.0, 1.0, 0.1]], dtype=torch.bfloat16)  # doctest: +SKIP
        >>> topk_sparsify(x.cuda(), 2)  # doctest: +SKIP
        tensor([[ 0., -2.,  1.,  0.]], device='cuda:0', dtype=torch.bfloat16)
    """
    if torch.compiler.is_compiling():
        return _topk_sparsify(x, k)
    if torch.is_grad_enabled() and x.requires_grad:
        return _TopKStraightThrough.apply(x, k, zeros)
    return topk_sparsify_rows(x, k, zeros)


def topk_select(x: torch.Tensor, k: int, zeros: torch.Tensor | None = None,
                hint_slot: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference top-K that also lists what it kept: ``(sparse, kept)``, ``kept`` the int32 ``[rows, k]`` ascending
    positions of each row (what `sparse_linear` gathers). ``qsparse::topk_select`` under ``torch.compile``.
    ``hint_slot`` (from `register_hint`) lets the kernel start from the last threshold of the same rows (faster
    one-token selections, same result); it is used when it has an entry per row on ``x``'s device.

    Example:
        >>> x = torch.tensor([[0.5, -2.0, 1.0, 0.1]], dtype=torch.bfloat16)  # doctest: +SKIP
        >>> topk_select(x.cuda(), 2)[1]  # doctest: +SKIP
        tensor([[1, 2]], device='cuda:0', dtype=torch.int32)
    """
    if torch.compiler.is_compiling():
        return _topk_select(x, k, hint_slot)
    return topk_sparsify_rows(x, k, zeros, indices=True, hint=_hint_for(hint_slot, x))


def silu_select(gate: torch.Tensor, k: int, up: torch.Tensor | None = None, zeros: torch.Tensor | None = None,
                hint_slot: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """`topk_select` of ``F.silu(gate)`` (times ``up`` when given): a gated FFN's activation on a decode step,
    ``(sparse, kept)``, where three kernels (SiLU, top-K, product) would run. ``zeros`` counts the zeros of the
    top-K, before the product (eager only).

    In eager mode this is one launch of one program per row (`topk.silu_topk_rows`): eager decode waits on host
    time per launch. Under ``torch.compile`` it is the ``qsparse::silu_select`` op, and while a CUDA graph is being
    captured the same launches: rows wider than `topk.SPLIT_FROM_KEYS` keys split over many programs (two
    launches, `topk.split_launch`) when the hint serves them, since those steps wait on GPU time, where one program
    computing SiLU (and the product) over a whole 14336-wide row was slower than the compiler's kernels around
    `topk_select`, and spills its registers at 18944. Every form gives the same result.

    Example:
        >>> gate = torch.randn(1, 64, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> sparse, kept = silu_select(gate, 16, up=torch.randn_like(gate))  # doctest: +SKIP
    """
    if torch.compiler.is_compiling():
        return _silu_select(gate, up, k, hint_slot)
    if gate.is_cuda and torch.cuda.is_current_stream_capturing():
        return _silu_select_rows(gate, up, k, hint_slot, zeros)
    return silu_topk_rows(gate, k, up, zeros, indices=True, hint=_hint_for(hint_slot, gate))


@torch.library.custom_op("qsparse::norm_select", mutates_args=())
def _norm_select(hidden: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float, k: int,
                 hint_slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    summed, normed, sparse, kept = norm_topk_rows(hidden, weight, eps, k, residual, _hint_for(hint_slot, hidden))
    return hidden.new_empty(0) if summed is None else summed, normed, sparse, kept


@_norm_select.register_fake
def _(hidden, residual, weight, eps, k, hint_slot):
    summed = hidden.new_empty(0) if residual is None else torch.empty_like(hidden)
    return (summed, torch.empty_like(hidden), torch.empty_like(hidden),
            hidden.new_empty(hidden.numel() // hidden.shape[-1], k, dtype=torch.int32))


def norm_select(hidden: torch.Tensor, weight: torch.Tensor, eps: float, k: int, residual: torch.Tensor | None = None,
                hint_slot: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``residual + hidden`` (``hidden`` itself without ``residual``), its RMSNorm with ``weight`` and ``eps``, and
    `topk_select` of the normed row: ``(summed, normed, sparse, kept)``, in one launch (`topk.norm_topk_rows`);
    ``qsparse::norm_select`` under ``torch.compile``. ``hint_slot`` as in `topk_select`.

    Example:
        >>> hidden = torch.randn(1, 1, 64, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> summed, normed, sparse, kept = norm_select(hidden, torch.ones(64, device="cuda", dtype=torch.bfloat16),
        ...                                            1e-6, 16, residual=torch.randn_like(hidden))  # doctest: +SKIP
    """
    if torch.compiler.is_compiling():
        summed, normed, sparse, kept = _norm_select(hidden, residual, weight, eps, k, hint_slot)
        return hidden if residual is None else summed, normed, sparse, kept
    summed, normed, sparse, kept = norm_topk_rows(hidden, weight, eps, k, residual, _hint_for(hint_slot, hidden))
    return hidden if summed is None else summed, normed, sparse, kept


def _check_decode_tokens(x: torch.Tensor) -> None:
    if x.numel() // x.shape[-1] > MAX_DECODE_TOKENS:
        raise ValueError(f"sparse_linear serves at most {MAX_DECODE_TOKENS} tokens; use F.linear for prefill")


def sparse_linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None,
                  zeros: torch.Tensor | None = None, kept: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight_t.T, bias)`` for up to `MAX_DECODE_TOKENS` tokens, reading only the needed weight rows.

    ``weight_t`` is ``[in_features, out_features]`` with unit column stride (its rows may be padded: a slice of a
    side-by-side block). With ``kept`` (one token; from `topk_select`) exactly those weight rows are read. Under
    ``torch.compile`` this is the ``qsparse::sparse_linear`` op; in eager mode the kernel is launched directly, and
    ``zeros`` receives the count of zeros in ``x``. Inference only.

    Example:
        >>> w = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> x = torch.zeros(1, 64, device="cuda", dtype=torch.bfloat16); x[0, :8] = 1  # doctest: +SKIP
        >>> sparse_linear(x, w.t().contiguous()).shape  # doctest: +SKIP
        torch.Size([1, 16])
    """
    _check_decode_tokens(x)
    if torch.compiler.is_compiling():
        return _sparse_linear(x, weight_t, bias, kept)
    return sparse_gemv(x, weight_t, bias, zeros=zeros, kept=kept)


def sparse_linear_block(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kept: torch.Tensor | None,
                        column: int, bias_column: int, width: int, guide: torch.Tensor | None = None,
                        hint_slot: int = -1, guide_silu: bool = False) -> torch.Tensor:
    """`sparse_linear` over the side-by-side block of width ``width`` whose columns ``column :`` the Parameter
    ``weight`` views (``bias``: a view of the block's bias from ``bias_column``, or None); see `block_of`. The form a
    compiled decode step uses (``qsparse::sparse_linear_block``); eager steps pass the block itself. ``guide`` and
    ``hint_slot``: the dense input that ``kept`` was selected from and its selection's hint, for `sparse_gemv`'s
    L2 prefetch (``guide_silu``: the selection was of the guide's SiLU); the result is the same without them.

    Example:
        >>> out = sparse_linear_block(x, k_proj.weight, k_proj.bias, None, 512, 512, 1536)  # doctest: +SKIP
    """
    _check_decode_tokens(x)
    if torch.compiler.is_compiling():
        return _sparse_linear_block(x, weight, bias, kept, column, bias_column, width, guide, hint_slot, guide_silu)
    return _gemv_through(x, weight, bias, kept, column, bias_column, width, guide, hint_slot, guide_silu)


def gated_select(x: torch.Tensor, kept: torch.Tensor | None, weight: torch.Tensor, gate_column: int, up_column: int,
                 width: int, inter: int, k: int, hint_slot: int = -1) -> tuple[torch.Tensor, ...]:
    """A gated FFN's one-token activation and its top-K from the gate/up GEMV's launch (`ffn.gated_select`):
    ``(act, product, state)``, with gate and up the columns ``gate_column :`` and ``up_column :`` (``inter`` each)
    of the side-by-side block of width ``width`` that the Parameter ``weight`` views (`block_of`). ``hint_slot``:
    the activation's threshold hint (`register_hint`). ``qsparse::gated_select`` under ``torch.compile``.

    Example:
        >>> act, product, state = gated_select(x, kept, w, 0, 14336, 28672, 14336, 7168, slot)  # doctest: +SKIP
    """
    if torch.compiler.is_compiling():
        return _gated_select(x, kept, weight, gate_column, up_column, width, inter, k, hint_slot)
    return _gated_through(x, kept, weight, gate_column, up_column, width, inter, k, hint_slot)


def gated_select_listed(x: torch.Tensor, kept: torch.Tensor | None, weight: torch.Tensor, gate_column: int,
                        up_column: int, width: int, inter: int, k: int,
                        hint_slot: int = -1) -> tuple[torch.Tensor, ...]:
    """`gated_select`'s arguments, `ffn.gated_select_listed`'s result: ``(sparse, kept)``, the sparse activation
    times up and the int32 ``[1, k]`` list of its kept features, for down's `sparse_linear_block` over exactly
    those rows. ``qsparse::gated_select_listed`` under ``torch.compile``.

    Example:
        >>> sparse, listed = gated_select_listed(x, kept, w, 0, 14336, 28672, 14336, 7168, slot)  # doctest: +SKIP
    """
    if torch.compiler.is_compiling():
        return _gated_select_listed(x, kept, weight, gate_column, up_column, width, inter, k, hint_slot)
    return _gated_through(x, kept, weight, gate_column, up_column, width, inter, k, hint_slot, listed=True)


def masked_linear_block(values: torch.Tensor, keys: torch.Tensor, state: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None, column: int, bias_column: int, width: int) -> torch.Tensor:
    """`gemv.masked_gemv` of `gated_select`'s ``product`` (masked by the top-K of ``act`` that ``state`` holds)
    over the block that ``weight`` (down's Parameter) views, as `sparse_linear_block` does for a plain product.
    ``qsparse::masked_linear_block`` under ``torch.compile``.

    Example:
        >>> out = masked_linear_block(product, act, state, down.weight, None, 0, 0, 4096)  # doctest: +SKIP
    """
    if torch.compiler.is_compiling():
        return _masked_linear_block(values, keys, state, weight, bias, column, bias_column, width)
    return _masked_through(values, keys, state, weight, bias, column, bias_column, width)


def select_linear(x: torch.Tensor, k: int, weight_t: torch.Tensor, bias: torch.Tensor | None = None,
                  zeros: torch.Tensor | None = None, hint_slot: int = -1) -> torch.Tensor:
    """``sparse_linear(topk(x, k), weight_t, bias)`` for one token in one launch (`gemv.select_gemv`), for eager
    decode only: no custom op, since a compiled or captured step runs the selection once, separately, faster.
    ``zeros`` receives the zeros of the sparse input; ``hint_slot`` as in `topk_select`.

    Example:
        >>> w = torch.randn(64, 16, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> select_linear(torch.randn(1, 64, device="cuda", dtype=torch.bfloat16), 32, w).shape  # doctest: +SKIP
        torch.Size([1, 16])
    """
    return select_gemv(x, k, weight_t, bias, zeros=zeros, hint=_hint_for(hint_slot, x))


def repeatable_linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None,
                      zeros: torch.Tensor | None = None, kept: torch.Tensor | None = None, k: int | None = None,
                      hint_slot: int = -1):
    """The eager launch of `sparse_linear` (with ``k``: of `select_linear`) for these arguments, to repeat for
    inputs of the same signature: ``(launch, hint)``, called as ``launch(x, in_features, weight_t, bias, zeros,
    kept, hint)``; ``(None, None)`` when there is none to repeat (see `gemv.repeat_launch`).

    Example:
        >>> launch, hint = repeatable_linear(x, weight_t, k=2048)  # doctest: +SKIP
    """
    hint = None if k is None else _hint_for(hint_slot, x)
    launch = repeat_launch(x, weight_t, bias, zeros, kept, k, hint)
    return launch, (hint if launch is not None else None)


def repeatable_select(x: torch.Tensor, k: int, zeros: torch.Tensor | None = None, hint_slot: int = -1, *,
                      silu: bool = False, multiply: bool = False):
    """The eager launch of `topk_select` (``silu``: of `silu_select`, ``multiply``: with ``up``) for these
    arguments, to repeat for inputs of the same signature: ``(launch, hint)``, called as ``launch(x, rows,
    row_stride, zeros, hint[, up, up_row_stride])`` -> ``(sparse, kept)``.

    Example:
        >>> launch, hint = repeatable_select(x, 2048)  # doctest: +SKIP
    """
    hint = _hint_for(hint_slot, x)
    return repeat_row_launch(x, k, zeros, indices=True, hint=hint, silu=silu, multiply=multiply), hint


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float | None = None) -> torch.Tensor:
    """One-token attention over a key/value cache in one launch (`attention.decode_attention`: arguments, result
    ``[batch, 1, heads, head_dim]``); ``qsparse::decode_attention`` under ``torch.compile``. Inference only.

    Example:
        >>> out = decode_attention(query, key_cache, value_cache, mask, module.scaling)  # doctest: +SKIP
    """
    if torch.compiler.is_compiling():
        return _decode_attention(query, key, value, mask, scale)
    return _decode_attention_launch(query, key, value, mask, scale)


def decode_attention_append(query: torch.Tensor, new_key: torch.Tensor, new_value: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            count: torch.Tensor, mask: torch.Tensor | None, scale: float | None = None, *,
                            advance: bool = True) -> torch.Tensor:
    """Rotary, the static-cache append and one-token attention in one launch (`attention.decode_attention_append`:
    arguments, result ``[batch, 1, heads, head_dim]``; the caches are written and, with ``advance``, the count
    advanced in place: a caller that leaves it must advance it itself before the next step);
    ``qsparse::decode_attention_append`` under ``torch.compile``. Inference only.

    Example:
        >>> out = decode_attention_append(q, k, v, cos, sin, layer.keys, layer.values, layer.cumulative_length,
        ...                               mask, module.scaling)  # doctest: +SKIP
    """
    if torch.compiler.is_compiling():
        out = _decode_attention_append(query, new_key, new_value, cos, sin, key_cache, value_cache, count, mask, scale)
    else:
        out = _decode_attention_append_launch(query, new_key, new_value, cos, sin, key_cache, value_cache, count,
                                              mask, scale)
    # An aten op the compiler orders against every read of the count: transformers' static cache derives the step's
    # positions (rotary, mask) from its first layer's count, and a write hidden in the custom op let Inductor
    # recompute them after it.
    if advance:
        count.add_(1)
    return out
