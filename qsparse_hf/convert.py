"""`convert_to_qsparse`: walk a causal LM and swap its linears (and gated-FFN activations) for Q-Sparse ones."""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

from torch import nn

from .attention import restore_attention, use_decode_attention
from .config import QSparseConfig
from .functional import keep_count
from .layers import (
    DecoderLayerForward, GatedFFNForward, InputSparsifier, QSparseActivation, QSparseExpertInput, QSparseLinear,
    RealTokenTracker,
)

__all__ = [
    "ARCHITECTURES",
    "ArchLayout",
    "convert_to_qsparse",
    "revert_qsparse",
    "is_qsparse_model",
    "qsparse_modules",
    "layout_for",
    "dense_matmul_modules",
    "sparsify_adapter_inputs",
]

logger = logging.getLogger(__name__)

#: A fractional topk that keeps fewer features than this per token (and under 10 % of them) gets a warning.
FEW_FEATURES = 8


@dataclass(frozen=True)
class ArchLayout:
    """How one family of decoder layers names its projections and its gated-FFN activation.

    ``roles`` maps a linear's own (last) name to the projection kind reported in sparsity tables; ``activation``
    names the attribute of the FFN module that holds the activation applied to ``gate(x)``; ``gate`` names the
    linear whose presence marks a module as a gated FFN; ``shared_inputs`` lists sibling linears that read the
    same tensor and so share one top-K mask. ``gated_ffn`` names (gate, up, down) when the FFN module's forward is
    exactly ``down(act(gate(x)) * up(x))``: eager decode then runs it fused (`layers.GatedFFNForward`).
    ``attention`` names (query, key, value, output) projections when the attention module's forward is Llama's --
    project, (``head_norms``: norm each head of query and key,) rotary, cache update, attention function, output
    projection -- so that compiled decode steps run its rotary and cache append inside the attention launch
    (`attention.DecodeAttentionForward`); None where the family's attention differs (softcapping, clipped or
    whole-projection norms). ``decoder_layer`` names (input norm, attention, post-attention norm, FFN) when the
    decoder layer's forward is Llama's pre-norm residual block with Llama's RMSNorm, so that compiled decode steps
    can compute each residual add and norm in the selection's launch (`layers.DecoderLayerForward`); None where it
    differs (scaled residuals, norms after the block, ``1 + weight`` norms).
    """

    roles: dict[str, str] = field(default_factory=dict)
    shared_inputs: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
    activation: tuple[str, ...] = ("act_fn",)
    gate: tuple[str, ...] = ("gate_proj",)
    gated_ffn: tuple[str, str, str] | None = None
    attention: tuple[str, str, str, str] | None = None
    head_norms: tuple[str, str] | None = None
    decoder_layer: tuple[str, str, str, str] | None = None


# Llama's attention and FFN. Alone (without Llama's decoder layer) for families with decoder layers or norms of
# their own: Gemma's norm scales by 1 + weight, Granite scales its residuals, Mixtral's FFN is a mixture of experts.
_LLAMA_BLOCKS = ArchLayout(
    roles={
        "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
        "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
    },
    gated_ffn=("gate_proj", "up_proj", "down_proj"),
    attention=("q_proj", "k_proj", "v_proj", "o_proj"),
)
_LLAMA = replace(_LLAMA_BLOCKS, decoder_layer=("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"))
_QWEN3 = replace(_LLAMA, head_norms=("q_norm", "k_norm"))
# Llama's names, with attention code of their own: Gemma2 softcaps its scores, OLMo clips q/k/v, OLMo2 normalises
# whole projections.
_LLAMA_NAMES = replace(_LLAMA_BLOCKS, attention=None)
_PHI3 = ArchLayout(
    roles={"qkv_proj": "qkv", "o_proj": "o", "gate_up_proj": "gate_up", "down_proj": "down"},
    activation=("activation_fn",),
    gate=("gate_up_proj",),
)

#: The only place that knows architectures: ``config.model_type`` -> layout. Families whose decoder layers use
#: Llama's names share one row. A model_type missing here goes through `GENERIC_LAYOUT`.
ARCHITECTURES: dict[str, ArchLayout] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "mixtral": _LLAMA_BLOCKS,
    "qwen2": _LLAMA,
    "qwen3": _QWEN3,
    "gemma": _LLAMA_BLOCKS,
    "gemma2": _LLAMA_NAMES,
    "olmo": _LLAMA_NAMES,
    "olmo2": _LLAMA_NAMES,
    "granite": _LLAMA_BLOCKS,
    "phi3": _PHI3,
}

#: Fallback for unknown architectures: every common projection name seen across HF decoders, and the usual
#: activation attribute names. Unknown linears are still converted and reported under their own name.
GENERIC_LAYOUT = ArchLayout(
    roles={
        **_LLAMA.roles,
        **_PHI3.roles,
        "out_proj": "o", "dense": "o", "c_proj": "o", "query_key_value": "qkv", "Wqkv": "qkv",
        "fc1": "up", "fc2": "down", "dense_h_to_4h": "up", "dense_4h_to_h": "down", "w1": "gate", "w3": "up",
        "w2": "down",
    },
    shared_inputs=(("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3")),
    activation=("act_fn", "activation_fn", "act"),
    gate=("gate_proj", "gate_up_proj", "w1"),
)


def layout_for(model: nn.Module) -> ArchLayout:
    """The `ArchLayout` for a model, from its ``config.model_type`` (generic fallback when unknown).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> layout_for(LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
        ...     num_attention_heads=2, vocab_size=100))).roles["gate_proj"]
        'gate'
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return ARCHITECTURES.get(model_type, GENERIC_LAYOUT)


_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def _layer_index(name: str) -> int | None:
    match = _LAYER_INDEX.search("." + name + ".")
    return int(match.group(1)) if match else None


def qsparse_modules(model: nn.Module) -> Iterator[tuple[str, QSparseLinear | QSparseActivation | QSparseExpertInput]]:
    """Yield ``(name, module)`` for every Q-Sparse module of a model (linears, FFN activations, MoE experts' inputs)."""
    for name, module in model.named_modules():
        if isinstance(module, (QSparseLinear, QSparseActivation, QSparseExpertInput)):
            yield name, module


def fused_expert_weights(module: nn.Module) -> tuple[int, int] | None:
    """``(input-side, down-projection)`` weight counts of a fused MoE experts module (all experts' weights as 3-D
    parameters, with an activation as ``act_fn`` or a gating method ``_apply_gate``), or None for other modules.

    Example:
        >>> fused_expert_weights(nn.Linear(4, 4)) is None
        True
    """
    stacked = [(name, p.numel()) for name, p in module.named_parameters(recurse=False) if p.dim() == 3]
    if not stacked or not (hasattr(module, "act_fn") or hasattr(module, "_apply_gate")):
        return None
    down = sum(n for name, n in stacked if name.startswith("down"))
    return sum(n for _, n in stacked) - down, down


def converted_weights(model: nn.Module) -> int:
    """Matrix weights whose inputs Q-Sparse sparsifies: converted linears' and converted fused MoE experts'.

    Example:
        >>> converted_weights(convert_to_qsparse(nn.Sequential(nn.Linear(4, 3)), topk=0.5))
        12
    """
    return sum(m.weight.numel() if isinstance(m, QSparseLinear) else m.weight_params for _, m in qsparse_modules(model))


def is_qsparse_model(model: nn.Module) -> bool:
    """True when the model holds at least one Q-Sparse module.

    Example:
        >>> is_qsparse_model(nn.Sequential(nn.Linear(4, 4)))
        False
    """
    return next(qsparse_modules(model), None) is not None


def _config_of(model: nn.Module) -> QSparseConfig | None:
    cfg = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(cfg, QSparseConfig):
        return cfg
    return getattr(model, "_qsparse_config", None)


def convert_to_qsparse(
    model: nn.Module,
    topk: float | int | None = None,
    *,
    config: QSparseConfig | None = None,
    **options: Any,
) -> nn.Module:
    """Make a model fully sparsely-activated with Q-Sparse, in place, and return it.

    Every ``nn.Linear`` (except ``lm_head`` by default) becomes a `QSparseLinear` that keeps only the top-K entries
    of ``|x|`` per token of its input; in gated FFNs the activation output ``act(gate(x))`` is also top-K
    sparsified. Linears that read the same tensor (q/k/v, gate/up) compute one mask between them. The config is
    recorded in ``model.config.quantization_config`` so ``save_pretrained``/``from_pretrained`` round-trip it.

    Args:
        model: any ``transformers`` causal LM (or any ``nn.Module`` with linears).
        topk: fraction of each linear's input features kept per token (float in (0, 1]), or a count (int >= 2).
            Defaults to 0.7. See `QSparseConfig` for the exact rounding.
        config: a full `QSparseConfig` instead of ``topk``/``options``.
        **options: any other `QSparseConfig` field (``ffn_topk``, ``exclude_modules``, ``activation``, ...).

    Converting an already converted model with the same config does nothing; with a different config it raises.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_pretrained("../shared/fixtures/mistral-micro")  # doctest: +SKIP
        >>> model = convert_to_qsparse(model, topk=0.7)                                       # doctest: +SKIP
    """
    if config is not None and (topk is not None or options):
        raise TypeError("pass either config=QSparseConfig(...) or topk/options, not both")
    if config is None:
        unknown = set(options) - QSparseConfig.option_names()
        if unknown:
            raise TypeError(
                f"unknown option(s) {sorted(unknown)} for convert_to_qsparse; valid options are "
                f"{sorted(QSparseConfig.option_names() - {'topk'})}"
            )
        config = QSparseConfig(topk=0.7 if topk is None else topk, **options)
    elif not isinstance(config, QSparseConfig):
        raise TypeError(f"config must be a QSparseConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_to_qsparse expects a torch nn.Module (a transformers model), got {type(model)}")

    if is_qsparse_model(model):
        existing = _config_of(model)
        if existing is not None and existing == config:
            return model
        raise ValueError(
            "this model is already converted to Q-Sparse with a different config "
            f"({existing.to_dict() if existing else 'unknown'}). Call qsparse_hf.revert_qsparse(model) first, or "
            "reload the dense model, to convert again with new settings."
        )

    replaced = _swap_modules(model, config)
    if replaced == 0:
        raise ValueError(
            f"convert_to_qsparse found no nn.Linear to convert in {type(model).__name__}"
            + (f" matching target_modules={config.target_modules}" if config.target_modules else "")
            + ". Q-Sparse sparsifies the inputs of linear projections; models built on other layer types "
            "(e.g. GPT-2's Conv1D) are not supported."
        )
    model._qsparse_config = config
    sparsify_adapter_inputs(model)
    RealTokenTracker.attach(model)  # sparsity counted over real tokens, not padding
    _attach_to_transformers(model, config)
    _forget_compiled_calls(model)  # generate(static) compiles the converted call, not one a deepcopy carried over
    _warn_dense_parts(model, config)
    return model


def _adapter_module_names(model: nn.Module) -> set[str]:
    """Names of the modules inside peft adapter layers other than their wrapped ``base_layer``."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return set()
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            for sub, _ in module.named_modules():
                if sub and not sub.startswith("base_layer"):
                    names.add(f"{name}.{sub}")
    return names


def _sparsified_adapter_input(adapter: nn.Module, args: tuple, kwargs: dict):
    base = adapter.get_base_layer()
    if not args or getattr(adapter, "merged", False) or getattr(adapter, "disable_adapters", False):
        return None
    return (base.sparsifier(args[0], base.training), *args[1:]), kwargs


def sparsify_adapter_inputs(model: nn.Module) -> int:
    """Let peft adapter layers (LoRA, ...) on converted linears read the top-K input too, and return how many.

    By default peft's LoRA branch reads the layer's dense input while the converted base layer reads its top-K
    input, so merging the adapter (``merge_and_unload``) changes the outputs. After this call both branches read
    the same sparse input (computed once, counted once): the model stays fully sparsely activated and merging is
    exact. Call it after ``get_peft_model``; `convert_to_qsparse` calls it itself on a model that already has
    adapters. Calling it again does nothing.

    Example:
        >>> model = get_peft_model(convert_to_qsparse(base, topk=0.7), LoraConfig(r=8))  # doctest: +SKIP
        >>> sparsify_adapter_inputs(model)                                                 # doctest: +SKIP
        28
    """
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return 0
    hooked = 0
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and isinstance(module.get_base_layer(), QSparseLinear):
            if not module.__dict__.get("_qsparse_input_hook"):
                module.register_forward_pre_hook(_sparsified_adapter_input, with_kwargs=True)
                module.__dict__["_qsparse_input_hook"] = True
                module.get_base_layer().sparsifier.feeds_adapters = True
            hooked += 1
    return hooked


def dense_matmul_modules(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """``(name, module, weights)`` of every module that multiplies activations with a weight of its own (a 2-D or
    higher parameter) and was not converted: the output head, routers, fused MoE experts (3-D weights), GPT-2's
    Conv1D, ... Embedding tables (a lookup) and peft adapter layers are not listed.

    Example:
        >>> [name for name, _, _ in dense_matmul_modules(nn.Sequential(nn.Linear(4, 4)))]
        ['0']
    """
    adapter_parts = _adapter_module_names(model)
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (QSparseLinear, nn.Embedding)) or name in adapter_parts:
            continue
        if isinstance(getattr(module, "qsparse_input", None), QSparseExpertInput):  # converted fused experts
            continue
        weights = sum(p.numel() for p in module.parameters(recurse=False) if p.dim() >= 2)
        if weights:
            found.append((name, module, weights))
    return found


def _warn_dense_parts(model: nn.Module, config: QSparseConfig) -> None:
    # Nothing is left dense without a word: name every matmul that is not sparsified (lm_head excluded on purpose
    # by default is said once at debug level only).
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    dense = [(name, module, n) for name, module, n in dense_matmul_modules(model)
             if not (module is head and "lm_head" in config.exclude_modules)
             and not config.matches(name, config.exclude_modules)]
    if not dense:
        return
    kinds: dict[str, list[str]] = {}
    for name, module, _ in dense:
        kinds.setdefault(type(module).__name__, []).append(name)
    total = sum(n for _, _, n in dense_matmul_modules(model)) + converted_weights(model)
    share = sum(n for _, _, n in dense) / total if total else 0.0
    listed = "; ".join(f"{kind} x{len(names)} (e.g. {names[0]})" for kind, names in kinds.items())
    routers = sum(_is_router(model, name) for name, _, _ in dense)
    linears = sum(isinstance(module, nn.Linear) for _, module, _ in dense)
    why = (("Linears among them were left out by target_modules/exclude_modules; the others are not nn.Linear"
            if linears else "They are not nn.Linear") + ", so Q-Sparse does not sparsify their inputs"
           + (f" ({routers} of them route tokens to sparsified MoE experts: routers are kept dense on purpose, the "
              "routing decision reads the whole hidden state)" if routers else ""))
    warnings.warn(
        f"convert_to_qsparse left {len(dense)} matmul module(s) of {type(model).__name__} dense "
        f"({100 * share:.1f}% of its matrix weights): {listed}. {why}; sparsity_report counts them as dense.",
        stacklevel=3,
    )


def _is_router(model: nn.Module, name: str) -> bool:
    """Whether ``name`` sits beside fused experts that were converted (the MoE block's router)."""
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    return any(isinstance(getattr(child, "qsparse_input", None), QSparseExpertInput) for child in parent.children())


def _selected(config: QSparseConfig, name: str, used_excludes: set, used_targets: set, is_head: bool = False) -> bool:
    """Whether module ``name`` is to be converted under ``exclude_modules`` / ``target_modules`` (noting which
    patterns matched, so that unused ones can be reported)."""
    excluded = config.matches(name, config.exclude_modules)
    if excluded is None and is_head and "lm_head" in config.exclude_modules:
        excluded = "lm_head"  # the output head, whatever this architecture calls it
    if excluded:
        used_excludes.add(excluded)
        return False
    if config.target_modules is not None:
        target = config.matches(name, config.target_modules)
        if target is None:
            return False
        used_targets.add(target)
    return True


def _swap_modules(model: nn.Module, config: QSparseConfig) -> int:
    layout = layout_for(model)
    used_excludes: set[str] = set()
    used_targets: set[str] = set()
    groups: dict[tuple, InputSparsifier] = {}
    replacements: list[tuple[str, nn.Module]] = []
    tiny_keeps: list[str] = []
    # "lm_head" in exclude_modules means the output head, whatever this architecture calls it.
    get_head = getattr(model, "get_output_embeddings", None)
    output_head = get_head() if callable(get_head) else None

    def sparsifier_for(parent: str, leaf: str, topk: float | int) -> InputSparsifier:
        # Siblings that read one tensor (q/k/v, gate/up) share a sparsifier when their settings agree; the
        # identity check inside it keeps that correct even if a model feeds them different tensors.
        group = next((g for g in layout.shared_inputs if leaf in g), leaf)
        candidate = InputSparsifier(
            topk,
            block_size=config.block_size,
            ste=config.ste,
            rescale=config.rescale,
            activation_bits=config.activation_bits,
        )
        return groups.setdefault((parent, group, candidate.settings()), candidate)

    adapter_parts = _adapter_module_names(model)
    for name, module in model.named_modules():
        # nn.Linear and its subclasses (falcon's FalconLinear, routers built on it); never a peft adapter's own
        # A/B linears, which belong to the adapter, not to the model being sparsified.
        if not isinstance(module, nn.Linear) or isinstance(module, QSparseLinear) or name in adapter_parts:
            continue
        if not _selected(config, name, used_excludes, used_targets, is_head=module is output_head):
            continue
        topk = config.topk_for(name)
        width = config.block_size or module.in_features
        if isinstance(topk, int) and topk > width:
            raise ValueError(
                f"topk={topk} (a count) exceeds the {width} input features of {name}; use a fraction, or a "
                f"topk_overrides entry for this module"
            )
        if config.block_size and module.in_features % config.block_size:
            raise ValueError(
                f"{name} has {module.in_features} input features, not a multiple of block_size={config.block_size}"
            )
        keep = keep_count(topk, width)
        if isinstance(topk, float) and keep < FEW_FEATURES and keep < 0.1 * width:
            tiny_keeps.append(f"{name} (K={keep} of {width})")
        parent, _, leaf = name.rpartition(".")
        new = QSparseLinear.from_linear(
            module,
            sparsifier_for(parent, leaf, topk),
            weight_bits=config.weight_bits,
            role=layout.roles.get(leaf, leaf),
            layer_index=_layer_index(name),
        )
        new.counter.enabled = config.track_sparsity
        replacements.append((name, new))

    for name, new in replacements:
        model.set_submodule(name, new)
    if tiny_keeps:
        # The int topk=1 is refused as ambiguous; a tiny fraction would silently do the same thing.
        warnings.warn(
            f"topk keeps fewer than {FEW_FEATURES} input features per token in {len(tiny_keeps)} linear(s), e.g. "
            f"{tiny_keeps[0]}: such a model computes almost nothing. Check the fraction (topk=0.7 keeps 70 %).",
            stacklevel=3,
        )

    ffn_topk = config.effective_ffn_topk
    if config.activation == "relu2" or ffn_topk != 1.0:
        replacements.extend(_swap_ffn_activations(model, config, layout, ffn_topk))
    replacements.extend(_sparsify_fused_experts(model, config, used_excludes, used_targets))

    for kind, patterns, used in (("exclude_modules", config.exclude_modules, used_excludes),
                                 ("target_modules", config.target_modules or [], used_targets)):
        for pattern in patterns:
            if pattern not in used and not (kind == "exclude_modules" and pattern == "lm_head"):
                warnings.warn(f"{kind} pattern {pattern!r} matched no nn.Linear in {type(model).__name__}", stacklevel=3)
    return sum(isinstance(module, QSparseLinear) for _, module in replacements)


def _swap_ffn_activations(model, config, layout, ffn_topk) -> list[tuple[str, nn.Module]]:
    swapped = []
    for name, module in list(model.named_modules()):
        if not any(isinstance(getattr(module, gate, None), nn.Linear) for gate in layout.gate):
            continue
        attr = next((a for a in layout.activation if hasattr(module, a)), None)
        if attr is None or isinstance(getattr(module, attr), QSparseActivation):
            continue
        sparsifier = InputSparsifier(ffn_topk, block_size=config.block_size, ste=config.ste, rescale=config.rescale)
        act = QSparseActivation(
            getattr(module, attr),
            sparsifier,
            relu2=config.activation == "relu2",
            layer_index=_layer_index(name + ".x"),
        )
        act.counter.enabled = config.track_sparsity
        setattr(module, attr, act)
        _skip_redundant_down_topk(module, layout, sparsifier)
        if layout.gated_ffn is not None:
            GatedFFNForward.install(module, *layout.gated_ffn, attr)
        swapped.append((f"{name}.{attr}" if name else attr, act))
    if config.activation == "relu2" and not swapped:
        raise ValueError(
            f"activation='relu2' needs a gated FFN, but no module of {type(model).__name__} has a "
            f"{'/'.join(layout.gate)} linear with an {'/'.join(layout.activation)} attribute"
        )
    return swapped


_GATE_CHILD = "qsparse_gate"  # the QSparseActivation wrapping fused experts' `_apply_gate` method


def _sparsify_fused_experts(model, config, used_excludes, used_targets) -> list[tuple[str, nn.Module]]:
    """Q-Sparse for fused MoE experts: top-K of the routed hidden state (gate/up input) and after the experts'
    activation (so the down projections read K features per row). The routers stay dense (see README)."""
    attached = []
    quantized: list[str] = []
    for name, module in list(model.named_modules()):
        weights = fused_expert_weights(module)
        if weights is None or isinstance(getattr(module, "qsparse_input", None), QSparseExpertInput):
            continue
        if not _selected(config, name, used_excludes, used_targets):
            continue
        num_experts = next(p.shape[0] for p in module.parameters(recurse=False) if p.dim() == 3)
        layer = _layer_index(name + ".x")
        sparsifier = InputSparsifier(config.topk_for(name), block_size=config.block_size, ste=config.ste,
                                     rescale=config.rescale, activation_bits=config.activation_bits)
        expert_input = QSparseExpertInput.attach(module, sparsifier, weight_params=weights[0],
                                                 num_experts=num_experts, layer_index=layer)
        expert_input.counter.enabled = config.track_sparsity
        # The activation: `act_fn` where the experts have one (top-K of act(gate), as in a dense gated FFN), else
        # the gating method's output (GPT-OSS's clamped GLU), which is what the down projections read.
        attr = "act_fn" if hasattr(module, "act_fn") else "_apply_gate"
        act = QSparseActivation(
            getattr(module, attr),
            InputSparsifier(config.effective_ffn_topk, block_size=config.block_size, ste=config.ste,
                            rescale=config.rescale),
            relu2=config.activation == "relu2" and attr == "act_fn",
            layer_index=layer,
        )
        act.feeds_experts(weights[1], expert_input)
        act.counter.enabled = config.track_sparsity
        if attr == "act_fn":
            setattr(module, attr, act)
        else:  # a method: the instance attribute must shadow it, and the child makes it a visible submodule
            attr = _GATE_CHILD
            module.add_module(attr, act)
            module.__dict__["_apply_gate"] = act
        if config.weight_bits is not None:
            quantized.append(name)
        attached += [(f"{name}.qsparse_input", expert_input), (f"{name}.{attr}", act)]
    if quantized:
        warnings.warn(
            f"weight_bits={config.weight_bits}: the fused MoE experts ({len(quantized)}, e.g. {quantized[0]}) keep "
            "their full-precision weights; only their inputs are sparsified (and quantized with activation_bits)",
            stacklevel=4,
        )
    return attached


def _skip_redundant_down_topk(ffn: nn.Module, layout, act_sparsifier: InputSparsifier) -> None:
    # down_proj reads act(gate) * up, which has at most K_act non-zeros per token. When its own K is no smaller, its
    # top-K would keep every non-zero and return the input unchanged (and, with the straight-through gradient, pass
    # the gradient unchanged): skipping it is exact and saves a selection per layer.
    for leaf, role in layout.roles.items():
        down = getattr(ffn, leaf, None)
        if role != "down" or not isinstance(down, QSparseLinear):
            continue
        own = down.sparsifier
        plain = own.block_size is None and own.activation_bits is None and not own.rescale and own.ste
        if plain and act_sparsifier.block_size is None and own.keep(down.in_features) >= act_sparsifier.keep(
            down.in_features
        ):
            own.input_within_topk = True
            own.source = act_sparsifier
            act_sparsifier.publishes_kept = True


def _attach_to_transformers(model: nn.Module, config: QSparseConfig) -> None:
    """Record the config where transformers looks for it, as its own quantizer would after loading."""
    model_config = getattr(model, "config", None)
    if model_config is None:
        return
    from .integration import QSparseHfQuantizer

    model_config.quantization_config = config
    model.hf_quantizer = QSparseHfQuantizer(config, pre_quantized=False)
    QSparseHfQuantizer.mark_model(model)
    # one-token attention in one launch (decode steps weigh the shared parts more)
    layout = layout_for(model)
    use_decode_attention(model, layout.attention, layout.head_norms)
    if layout.decoder_layer is not None and layout.attention is not None and layout.gated_ffn is not None:
        folded = [module for module in model.modules()
                  if DecoderLayerForward.install(module, layout.decoder_layer, layout.attention[0],
                                                 layout.gated_ffn[0])]
        if folded:  # (modules() lists the layers in the order the model runs them)
            folded[-1].forward.last = True


#: What transformers' ``get_compiled_call`` (``generate(cache_implementation="static")``) keeps on a model.
_COMPILED_CALL_ATTRIBUTES = ("_compiled_call", "_last_compile_config")


def _forget_compiled_calls(model: nn.Module) -> None:
    """Drop the compiled ``__call__`` that transformers' ``generate()`` stored on ``model`` (or a model inside it),
    so that the next ``generate(cache_implementation="static")`` compiles this model's own call.

    ``copy.deepcopy`` keeps that attribute pointing at the *original* model's call (functions are copied by
    reference): a copy converted after the original ran ``generate(static)`` would otherwise decode with the
    original's forward -- the dense model, or another keep -- without a word.

    Example:
        >>> model = nn.Linear(2, 2); model._compiled_call = print
        >>> _forget_compiled_calls(model); hasattr(model, "_compiled_call")
        False
    """
    for module in model.modules():
        for attribute in _COMPILED_CALL_ATTRIBUTES:
            module.__dict__.pop(attribute, None)


def revert_qsparse(model: nn.Module) -> nn.Module:
    """Undo `convert_to_qsparse` in place: plain ``nn.Linear`` and original activations, config entry removed.

    The Parameters are the same objects, so a model trained sparse can be evaluated dense (or re-converted with
    another ``topk``). ``model.dequantize()`` does the same for transformers models.

    Example:
        >>> model = convert_to_qsparse(nn.Sequential(nn.Linear(4, 4)), topk=0.5)
        >>> type(revert_qsparse(model)[0]).__name__
        'Linear'
    """
    for name, module in list(qsparse_modules(model)):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, QSparseLinear):
            model.set_submodule(name, module.to_linear())
        elif isinstance(module, QSparseExpertInput):
            module.detach(parent)
        elif attr == _GATE_CHILD:  # the experts' own gating method again
            del parent._modules[attr]
            parent.__dict__.pop("_apply_gate", None)
        else:
            GatedFFNForward.uninstall(parent)
            setattr(parent, attr, module.act if not module.relu2 else _Relu2())
    model_config = getattr(model, "config", None)
    if model_config is not None and isinstance(getattr(model_config, "quantization_config", None), QSparseConfig):
        del model_config.quantization_config
        model_config._is_quantized = False
    RealTokenTracker.detach(model)
    restore_attention(model)
    for module in model.modules():
        DecoderLayerForward.uninstall(module)
    _forget_compiled_calls(model)
    for attr in ("hf_quantizer", "quantization_method", "_qsparse_config"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    model.__dict__.pop("push_to_hub", None)  # back to transformers' own upload
    return model


class _Relu2(nn.Module):
    """Squared ReLU as a module, so a relu2 model stays relu2 after `revert_qsparse`."""

    def forward(self, x):
        from .functional import relu2

        return relu2(x)
