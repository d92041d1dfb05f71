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

Before the attention function is called, the model's own attention code has already applied the rotary embedding
and appended the step's key and value to the cache: three more compiler kernels a layer. `DecodeAttentionForward`,
set as the forward of attention modules that follow Llama's code (`convert.ArchLayout.attention`), runs the
projections as the module does and then `kernels.attention.decode_attention_append` -- rotary, the append to
transformers' static cache and the attention in one launch -- on the same compiled one-token steps; everything else
goes to the module's own forward.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from . import kernels
from .layers import _KERNEL_DTYPES, ModuleForward

__all__ = ["ATTENTION_NAME", "DecodeAttentionForward", "qsparse_sdpa_attention", "qsparse_sdpa_mask",
           "register_attention", "use_decode_attention", "restore_attention"]

logger = logging.getLogger(__name__)

#: The attention implementation a converted model runs (``model.config._attn_implementation``).
ATTENTION_NAME = "qsparse_sdpa"
# Keyword arguments that change what attention computes in ways the decode kernel does not (transformers passes
# them to the attention function when a model uses them): those calls go to SDPA.
_UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias")


def _decode_step(module: nn.Module, tokens: int, kwargs: dict) -> bool:
    """Whether a call may take the decode kernel before its tensors are looked at: a compiled one-token step of a
    module in inference, with no argument that changes what attention computes."""
    if not (kernels.DECODE_ATTENTION and torch.compiler.is_compiling()) or tokens != 1 or module.training:
        return False
    return not (any(kwargs.get(name) is not None for name in _UNSUPPORTED) or kwargs.get("output_attentions"))


def _decodes(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attention_mask: torch.Tensor | None, dropout: float, kwargs: dict) -> bool:
    """Whether the decode kernel serves this call (see the module's docstring)."""
    if dropout or not _decode_step(module, query.shape[-2], kwargs):
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


try:
    from transformers.cache_utils import StaticLayer
except ImportError:  # a transformers without per-layer caches: the model's own code appends
    StaticLayer = None


#: The static-cache counts a compiled step's appends left to advance (``"pending"``: from the call of a model's first
#: `DecodeAttentionForward` to the end of its last one's, which advances them all in one ``_foreach_add_``): one
#: kernel a step where each layer's own ``add_`` was one kernel a layer. Gone by the end of the compiled forward,
#: like `layers`' traced dicts.
_TRACED_COUNTS: dict = {}


class DecodeAttentionForward(ModuleForward):
    """The forward of a converted model's attention module whose own forward is Llama's (projections, optional
    per-head norms of query and key, rotary embedding, cache update, attention function, output projection;
    `convert.ArchLayout.attention`), set by `convert_to_qsparse` where the model runs ``"qsparse_sdpa"``
    (`revert_qsparse` removes it).

    A compiled one-token step in inference over transformers' static cache (``generate(cache_implementation=
    "static")``, a compiled forward with a ``StaticCache``) runs the projections (and norms) as the module does,
    then `kernels.attention.decode_attention_append`: the rotary embedding of the query and the new key, the append
    of the key and value to the cache layer (its count advanced as ``StaticLayer.update`` advances it) and the
    attention, in one launch. Everything else -- eager steps, prefill, training, other caches (dynamic, sliding
    window, offloaded), ``output_attentions``, ``QSPARSE_DECODE_APPEND=0`` -- runs the module's own forward. The
    rotary rounds as the model's code does in eager mode (each product and the sum), so the appended keys are the
    eager path's bit for bit. The count's advance waits for the step's last attention module (``closes``), which
    makes every deferred one in one launch: nothing in the step reads a layer's count after its own launch
    (transformers derives the step's positions from the first layer's count before any layer runs).

    Example:
        >>> attention = model.model.layers[0].self_attn  # of a converted Qwen2  # doctest: +SKIP
        >>> type(attention.forward).__name__  # doctest: +SKIP
        'DecodeAttentionForward'
    """

    __slots__ = ("names", "head_norms", "opens", "closes")

    def __init__(self, module: nn.Module, names: tuple[str, str, str, str], head_norms: tuple[str, str] | None):
        super().__init__(module)
        self.names = names
        self.head_norms = head_norms
        #: The model's first and last attention modules with this forward (`use_decode_attention` sets them): the
        #: first lets a compiled step's appends defer their counts' advance, the last makes it.
        self.opens = self.closes = False

    @classmethod
    def install(cls, module: nn.Module, names: tuple[str, str, str, str],
                head_norms: tuple[str, str] | None = None) -> bool:
        """Set the forward on ``module`` when it has the named projections (and norms), the attributes Llama's
        attention code reads (``layer_idx``, ``head_dim``, ``scaling``) and no forward of its own set already;
        returns whether it did."""
        children = module._modules
        if (StaticLayer is None or "forward" in module.__dict__
                or not all(isinstance(children.get(name), nn.Module) for name in names + (head_norms or ()))
                or not all(isinstance(getattr(module, name, None), (int, float))
                           for name in ("layer_idx", "head_dim", "scaling"))):
            return False
        module.forward = cls(module, names, head_norms)
        return True

    def __call__(self, *args, **kwargs):
        if not (torch.compiler.is_compiling() and kernels.DECODE_APPEND):
            return self.module_forward(self.module, *args, **kwargs)
        if self.opens:
            _TRACED_COUNTS["pending"] = []
        out = self._append_step(args, kwargs)
        if out is None:
            out = self.module_forward(self.module, *args, **kwargs)
        if self.closes:
            pending = _TRACED_COUNTS.pop("pending", None)
            if pending:
                torch._foreach_add_(pending, 1)
        return out

    def _append_step(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, None] | None:
        """The step through the one-launch append, or None (nothing computed) where it does not apply."""
        module = self.module
        if len(args) > 1 or (len(args) == 1) == ("hidden_states" in kwargs):
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # (renamed in transformers 5.2x)
        rotary = kwargs.get("position_embeddings")
        layers = getattr(cache, "layers", None)
        if (hidden.dim() != 3 or hidden.dtype not in _KERNEL_DTYPES or rotary is None or not isinstance(layers, list)
                or module.layer_idx >= len(layers)
                or getattr(cache, "offloading", False) or _attention_of(module) != ATTENTION_NAME
                or not _decode_step(module, hidden.shape[1], kwargs) or not kernels.kernels_available(hidden)):
            return None
        layer = layers[module.layer_idx]
        if type(layer) is not StaticLayer or not layer.is_initialized:  # (its subclasses slide or are offloaded)
            return None
        from .kernels.attention import check_decode_append
        from .kernels.ops import decode_attention_append

        q_proj, k_proj, v_proj, o_proj = (getattr(module, name) for name in self.names)
        shape = (*hidden.shape[:-1], -1, module.head_dim)
        query, key, value = q_proj(hidden).view(shape), k_proj(hidden).view(shape), v_proj(hidden).view(shape)
        if self.head_norms is not None:
            q_norm, k_norm = (getattr(module, name) for name in self.head_norms)
            query, key = q_norm(query), k_norm(key)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        cos, sin = rotary
        mask = kwargs.get("attention_mask")
        if (query.requires_grad or check_decode_append(query, key, value, cos, sin, layer.keys, layer.values,
                                                       layer.cumulative_length, mask) is not None):
            # (the projections are done: the rest of the module's code, as it would run; the families served share
            # Llama's rotary function)
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
            keys, values = layer.update(key, value)
            out, _ = qsparse_sdpa_attention(module, query, keys, values, mask, scaling=module.scaling)
        else:
            pending = _TRACED_COUNTS.get("pending")  # (the step's last attention module advances the count)
            out = decode_attention_append(query, key, value, cos, sin, layer.keys, layer.values,
                                          layer.cumulative_length, mask, module.scaling, advance=pending is None)
            if pending is not None:
                pending.append(layer.cumulative_length)
        return o_proj(out.reshape(*hidden.shape[:-1], -1)), None


def qsparse_sdpa_mask(*args, **kwargs) -> torch.Tensor | None:
    """The attention mask of ``"qsparse_sdpa"``: transformers' ``sdpa_mask`` (same arguments), made under
    ``torch.compile`` by one opaque op (`kernels.ops.step_input`) so that the compiled step computes it once: the
    mask every layer's decode attention reads was otherwise computed again for each layer (on an H100, one kernel a
    layer: benchmarks/README.md, thirty-fourth stop).

    Example:
        >>> qsparse_sdpa_mask(batch_size=1, q_length=1, kv_length=3, q_offset=1, allow_is_causal_skip=False).tolist()
        [[[[True, True, False]]]]
    """
    mask = sdpa_mask(*args, **kwargs)
    if isinstance(mask, torch.Tensor) and torch.compiler.is_compiling():
        from .kernels.ops import step_input

        mask = step_input(mask)
    return mask


def register_attention() -> None:
    """Register ``"qsparse_sdpa"`` with transformers' attention and attention-mask interfaces (idempotent; done on
    ``import qsparse_hf``). The mask is SDPA's (`qsparse_sdpa_mask`).

    Example:
        >>> register_attention(); register_attention()  # safe to call twice
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, qsparse_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, qsparse_sdpa_mask)


def _attention_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def use_decode_attention(model: nn.Module, names: tuple[str, str, str, str] | None = None,
                         head_norms: tuple[str, str] | None = None) -> bool:
    """Switch a transformers model whose attention is ``"sdpa"`` to ``"qsparse_sdpa"``; True when it did. Other
    implementations (eager, flash attention, flex) are left as chosen. With ``names`` (query, key, value and output
    projections of a Llama-style attention module; ``head_norms``: its per-head query and key norms), the attention
    modules that have them also get `DecodeAttentionForward`. `convert_to_qsparse` calls this with its
    architecture table's names (`convert.ArchLayout.attention`).

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
    if _attention_of(model) != ATTENTION_NAME:
        return False
    if names is not None:
        installed = [module.forward for module in model.modules()
                     if DecodeAttentionForward.install(module, names, head_norms)]
        if installed:  # (modules() lists the layers in the order the model runs them)
            installed[0].opens = installed[-1].closes = True
    return True


def restore_attention(model: nn.Module) -> None:
    """Undo `use_decode_attention` (``"qsparse_sdpa"`` back to ``"sdpa"``); `revert_qsparse` calls this.

    Example:
        >>> restore_attention(model); model.config._attn_implementation  # doctest: +SKIP
        'sdpa'
    """
    for module in model.modules():
        DecodeAttentionForward.uninstall(module)
    if _attention_of(model) == ATTENTION_NAME:
        model.set_attn_implementation("sdpa")
