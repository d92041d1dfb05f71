"""How far `convert_to_qsparse` gets on every causal LM transformers registers: the support matrix.

For each ``model_type`` of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` a tiny random model is built from the type's own
default config, shrunk generically (a handful of per-type fix-ups in `FIXUPS`), converted at ``topk=0.5`` and run
once on a few tokens. The outcome says what a user gets:

- ``full``: every matrix weight of the decoder is sparsified (``lm_head`` excluded by default, MoE routers dense on
  purpose);
- ``partial``: some matmul weights stay dense, and the conversion warning names them (``dense`` lists them);
- ``refused``: `convert_to_qsparse` raises a clear error (no ``nn.Linear`` to convert);
- ``unbuilt``: no tiny model could be built here (``reason``), so nothing is claimed.

``bypassed`` lists converted linears that the forward never called (their weight is read directly, so the
conversion has no effect there). ``python tools/support_matrix.py`` regenerates the README's matrix from this.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import nn

__all__ = ["FIXUPS", "check_model_type", "check_registry", "registry_types"]

#: Generic shrink: applied to every config that has the attribute.
_SHRINK = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=256, max_position_embeddings=128, moe_intermediate_size=64, num_experts=4,
    num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=64,
    ffn_hidden_size=128, n_embd=64, n_layer=2, n_head=4, d_model=64, n_positions=128, num_layers=2, n_ctx=128,
    d_ff=128, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=128, encoder_layers=2,
    encoder_attention_heads=4, encoder_ffn_dim=128, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
    qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1,
)

#: Per-type fix-ups the generic shrink cannot guess.
FIXUPS: dict[str, dict[str, Any]] = {
    "gpt_oss": {"layer_types": ["full_attention"] * 2},
    "deepseek_v3": {"first_k_dense_replace": 1, "rope_scaling": None},
}

_MAX_PARAMS = 30_000_000


def registry_types() -> list[str]:
    """Every ``model_type`` transformers maps to a causal-LM class.

    Example:
        >>> "llama" in registry_types()
        True
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _tiny_config(model_type: str):
    from transformers import CONFIG_MAPPING

    from transformers import PretrainedConfig

    config_class = CONFIG_MAPPING[model_type]
    default = config_class()
    nested = [name for name, value in vars(default).items() if isinstance(value, PretrainedConfig)
              and any(part in name for part in ("text", "vision", "audio", "speech"))]
    if nested:  # multimodal: the vision/audio towers would need shrinking of their own
        raise RuntimeError(f"composite config ({', '.join(nested)}), not shrunk generically")
    accepted = set(inspect.signature(config_class.__init__).parameters)

    def settable(name: str) -> bool:  # read-only properties (derived values) cannot be passed
        return not isinstance(getattr(config_class, name, None), property)

    kwargs = {k: v for k, v in _SHRINK.items() if (hasattr(default, k) or k in accepted) and settable(k)}
    for name in ("layer_types", "layers_block_type"):
        if isinstance(getattr(default, name, None), list) and settable(name):
            kwargs[name] = getattr(default, name)[:2]
    vocab = kwargs.get("vocab_size", getattr(default, "vocab_size", None))
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):  # special ids must fit the shrunk vocabulary
        value = getattr(default, name, None)
        if isinstance(value, int) and vocab and value >= vocab and settable(name):
            kwargs[name] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[name]
    kwargs.update(FIXUPS.get(model_type, {}))
    return config_class(**kwargs)


def _build(model_type: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(_tiny_config(model_type))
    size = sum(p.numel() for p in model.parameters())
    if size > _MAX_PARAMS:
        raise RuntimeError(f"the shrunk config still has {size / 1e6:.0f}M parameters")
    return model.eval()


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:160]


def check_model_type(model_type: str) -> dict[str, Any]:
    """Build, convert and run a tiny model of ``model_type``; the outcome as a dict (see the module docstring).

    Example:
        >>> check_model_type("llama")["outcome"]
        'full'
    """
    from .convert import _is_router, convert_to_qsparse, converted_weights, dense_matmul_modules, qsparse_modules
    from .layers import QSparseLinear

    try:
        model = _build(model_type)
    except Exception as error:  # noqa: BLE001 - any failure to build means "nothing claimed"
        return {"outcome": "unbuilt", "reason": f"{type(error).__name__}: {_first_line(error)}"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            convert_to_qsparse(model, topk=0.5)
        except ValueError as error:
            return {"outcome": "refused", "reason": _first_line(error)}
    warned = " ".join(str(w.message) for w in caught if "left" in str(w.message) and "dense" in str(w.message))
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    dense = {}
    routers = 0
    for name, module, weights in dense_matmul_modules(model):
        if module is head:
            continue
        if _is_router(model, name):
            routers += weights
            continue
        dense[type(module).__name__] = dense.get(type(module).__name__, 0) + weights
    converted = converted_weights(model)
    total = converted + routers + sum(dense.values())
    result = {
        "outcome": "partial" if dense else "full",
        "converted_share": round(converted / total, 4) if total else 0.0,
        "dense": dict(sorted(dense.items())),
        "named_in_warning": all(kind in warned for kind in dense),
    }
    try:
        ids = torch.randint(1, 32, (1, 6))
        with torch.no_grad():
            model(input_ids=ids)
        result["bypassed"] = sorted(name for name, m in qsparse_modules(model)
                                    if isinstance(m, QSparseLinear) and m.counter.elements == 0)
    except Exception as error:  # noqa: BLE001 - some types need more than input_ids; conversion is still reported
        result["forward"] = f"{type(error).__name__}"
    return result


class _TookTooLong(BaseException):  # not caught by the per-step "except Exception"
    pass


def check_registry(types: list[str] | None = None, seconds_each: int = 60, progress: bool = True) -> dict[str, dict]:
    """`check_model_type` for every registered type (or ``types``), each given ``seconds_each`` (on POSIX main
    threads; a type that takes longer is ``unbuilt``, with that reason).

    Example:
        >>> check_registry(["llama"], progress=False)["llama"]["outcome"]
        'full'
    """
    import signal

    from tqdm.auto import tqdm

    if seconds_each < 1:
        raise ValueError(f"seconds_each must be at least 1 (a time limit per model type), got {seconds_each}")
    known = registry_types()
    unknown = sorted(set(types or ()) - set(known))
    if unknown:
        raise ValueError(f"not causal-LM model types of this transformers: {unknown}; see registry_types()")

    def alarm(signum, frame):
        raise _TookTooLong

    can_alarm = hasattr(signal, "SIGALRM")
    previous = signal.signal(signal.SIGALRM, alarm) if can_alarm else None
    results = {}
    try:
        for model_type in tqdm(known if types is None else types, desc="model types", disable=not progress):
            if can_alarm:
                signal.alarm(seconds_each)
            try:
                results[model_type] = check_model_type(model_type)
            except _TookTooLong:
                results[model_type] = {"outcome": "unbuilt", "reason": f"took over {seconds_each} s"}
            finally:
                if can_alarm:
                    signal.alarm(0)
    finally:
        if can_alarm:
            signal.signal(signal.SIGALRM, previous)
    return results
