"""Decode-step attention for converted models: transformers' SDPA attention, with one-token steps in one kernel.

A converted model spends its decode step on fewer weight bytes, so the parts it shares with dense weigh more; on a
compiled step transformers' SDPA attention is five kernels a layer (the grouped key/value heads copied out per query
head, the layouts SDPA wants, the attention itself). `convert_to_qsparse` therefore switches a model whose attention
is ``"sdpa"`` (transformers' default) to ``"qsparse_sdpa"``, registered with transformers' ``AttentionInterface``:
one-token queries of a compiled step on a kernel device (``generate(cache_implementation="static")``,
``torch.compile``) go to `kernels.attention.decode_attention` (one launch, the cache read in place), everything else
-- prefill, training, eager steps, float masks, softcapping, attention sinks, CPU -- to transformers' own
``sdpa_attention_forward``, unchanged. Eager steps stay on SDPA because they wait on the host, not on the GPU
(the kernel saves GPU time), and so keep the rounding of the reference path's attention: with the kernel in eager
steps too, greedy decoding of the embedded mistral-micro on an H100 parted from the reference path within 256
tokens (one bf16 bit of an attention output can move a feature across the next top-K's cut-off).
`revert_qsparse` switches back; ``config.json`` never records it (transformers does not save the attention
implementation), and ``QSPARSE_DECODE_ATTENTION=0`` keeps every call on SDPA.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import kernels

__all__ = ["ATTENTION_NAME", "qsparse_sdpa_attention", "register_attention", "use_decode_attention",
           "restore_attention"]

logger = logging.getLogger(__name__)

#: The attention implementation a converted model runs (``model.config._attn_implementation``).
ATTENTION_NAME = "qsparse_sdpa"
# Keyword arguments that change what attention computes in ways the decode kernel does not (transformers passes
# them to the attention function when a model uses them): those calls go to SDPA.
_UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias")


def _decodes(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attention_mask: torch.Tensor | None, dropout: float, kwargs: dict) -> bool:
    """Whether the decode kernel serves this call (see the module's docstring)."""
    if not (kernels.DECODE_ATTENTION and torch.compiler.is_compiling()):
        return False
    if query.shape[-2] != 1 or dropout or module.training:
        return False
    if any(kwargs.get(name) is not None for name in _UNSUPPORTED) or kwargs.get("output_attentions"):
        return False
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return False
    from .kernels.attention import check_decode_attention

    return kernels.kernels_available(query) and check_decode_attention(query, key, value, attention_mask) is None


def qsparse_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``(output [batch, tokens, heads, head_dim], None)``. One-token
    steps of a compiled decode run `kernels.attention.decode_attention`; every other call is transformers' SDPA
    attention.

    Example:
        >>> from transformers import AttentionInterface
        >>> AttentionInterface()[ATTENTION_NAME] is qsparse_sdpa_attention  # registered on import qsparse_hf
        True
    """
    if _decodes(module, query, key, value, attention_mask, dropout, kwargs):
        from .kernels.ops import decode_attention

        return decode_attention(query, key, value, attention_mask, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register_attention() -> None:
    """Register ``"qsparse_sdpa"`` with transformers' attention and attention-mask interfaces (idempotent; done on
    ``import qsparse_hf``). The mask is SDPA's.

    Example:
        >>> register_attention(); register_attention()  # safe to call twice
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, qsparse_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _attention_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def use_decode_attention(model: nn.Module) -> bool:
    """Switch a transformers model whose attention is ``"sdpa"`` to ``"qsparse_sdpa"``; True when it did. Other
    implementations (eager, flash attention, flex) are left as chosen. `convert_to_qsparse` calls this.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                                      num_attention_heads=2, vocab_size=16))
        >>> model.config._attn_implementation, use_decode_attention(model), model.config._attn_implementation
        ('sdpa', True, 'qsparse_sdpa')
    """
    if _attention_of(model) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except (ValueError, KeyError, ImportError) as error:  # a model class that takes no registered attention
        logger.info("qsparse_hf: %s keeps transformers' sdpa attention (%s)", type(model).__name__, error)
        return False
    return _attention_of(model) == ATTENTION_NAME


def restore_attention(model: nn.Module) -> None:
    """Undo `use_decode_attention` (``"qsparse_sdpa"`` back to ``"sdpa"``); `revert_qsparse` calls this.

    Example:
        >>> restore_attention(model); model.config._attn_implementation  # doctest: +SKIP
        'sdpa'
    """
    if _attention_of(model) == ATTENTION_NAME:
        model.set_attn_implementation("sdpa")
