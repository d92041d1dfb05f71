"""`QSparseConfig`: every Q-Sparse option, validated once, serialised into ``config.json``."""

from __future__ import annotations

import math
import re
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

__all__ = ["QSparseConfig", "QUANT_METHOD", "LOADING_NOTE", "validate_topk"]

QUANT_METHOD = "qsparse"
# Bumped when the meaning of a stored field changes, so old checkpoints can be read correctly.
CONFIG_FORMAT_VERSION = 1

_ACTIVATIONS = (None, "relu2")

#: Written into every saved config.json and safetensors header: transformers alone loads these checkpoints dense
#: (and its warning even suggests deleting quantization_config), so the files themselves say what to do.
LOADING_NOTE = (
    "This is a Q-Sparse checkpoint. Install qsparse_hf (from its source: it is not on PyPI) and `import qsparse_hf` before "
    "`AutoModelForCausalLM.from_pretrained(...)`; without it transformers loads a DENSE model with different outputs. "
    "Do not delete quantization_config."
)


def validate_topk(value: Any, name: str = "topk") -> float | int:
    """Check a keep setting: a float in (0, 1] (fraction of features kept per token) or an int K >= 2.

    Returns the value unchanged, or raises ``TypeError``/``ValueError`` saying what to pass instead.

    Example:
        >>> validate_topk(0.7), validate_topk(64)
        (0.7, 64)
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a float in (0, 1] (fraction of input features kept per token) or an int K >= 2 "
            f"(features kept), got {value!r} of type {type(value).__name__}"
        )
    if isinstance(value, float):
        if math.isnan(value) or not 0.0 < value <= 1.0:
            raise ValueError(
                f"{name}={value!r} is outside (0, 1]: it is the fraction of input features kept per token, "
                f"e.g. 0.7 keeps 70%; pass 1.0 to keep everything"
            )
        return value
    if value == 1:
        raise ValueError(
            f"{name}=1 (an int) would keep a single feature per token; pass 1.0 to keep all features, "
            f"or an int K >= 2 for a fixed count"
        )
    if value < 1:
        raise ValueError(f"{name}={value} must be a positive count (int K >= 2) or a float fraction in (0, 1]")
    return value


class QSparseConfig(QuantizationConfigMixin):
    """Configuration of a Q-Sparse conversion; stored as ``quantization_config`` in ``config.json``.

    Args:
        topk: what each converted linear keeps of its input, per token. A float in (0, 1] is the **fraction of the
            input features kept** (``K = floor(topk · in_features)``, at least 1): ``topk=0.7`` zeroes the 30 %
            smallest-magnitude entries. An int is the count ``K`` itself. ``1.0`` keeps everything and gives
            outputs bit-identical to the dense model.
        ffn_topk: keep setting for the top-K applied right after the activation of gated FFNs
            (``act(gate(x))``); defaults to ``topk``. ``1.0`` disables it.
        target_modules: which ``nn.Linear`` modules to convert (None: all of them, minus ``exclude_modules``).
            Each entry is a module name matched on dot boundaries (``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``
            but ``"layers.1"`` never matches ``"layers.10"``), or a regular expression matched against the full name.
        exclude_modules: modules left dense, matched the same way. Default ``["lm_head"]``: the paper sparsifies
            the Transformer's projections, not the output head.
        topk_overrides: ``{pattern: keep}`` per-module keep settings (first matching pattern wins), e.g.
            ``{"down_proj": 0.5}``.
        activation: ``None`` keeps the model's FFN activation; ``"relu2"`` replaces it with squared ReLU (for
            training from scratch, as in the paper).
        ste: straight-through estimator in the backward pass (default True). False zeroes the gradient of masked
            entries: for ablations only.
        rescale: re-scale each sparsified token vector to the dense vector's L2 norm (off by default, like the
            paper's reference code).
        block_size: Block Q-Sparse (N:M): keep ``keep_count(topk, block_size)`` entries in every block of
            ``block_size`` consecutive features instead of a global top-K. Batch- and tensor-core-friendly.
        weight_bits: ``None`` (full precision) or ``1.58`` (ternary BitNet b1.58 weights, fake-quantized with STE;
            the master weights stay in full precision).
        activation_bits: ``None`` or ``8``: per-token absmax quantization of each linear's input before its top-K.
        track_sparsity: measure the sparsity each converted module produces (for `sparsity_report` and
            `QSparseCallback`). Costs one reduction per shared input; turn off for maximum speed.

    Example:
        >>> cfg = QSparseConfig(topk=0.7, topk_overrides={"down_proj": 0.5})
        >>> cfg.topk_for("model.layers.3.mlp.down_proj"), cfg.topk_for("model.layers.3.self_attn.q_proj")
        (0.5, 0.7)
    """

    def __init__(
        self,
        topk: float | int = 0.7,
        ffn_topk: float | int | None = None,
        target_modules: list[str] | str | None = None,
        exclude_modules: list[str] | str | None = ("lm_head",),
        topk_overrides: dict[str, float | int] | None = None,
        activation: str | None = None,
        ste: bool = True,
        rescale: bool = False,
        block_size: int | None = None,
        weight_bits: float | None = None,
        activation_bits: int | None = None,
        track_sparsity: bool = True,
        quant_method: str = QUANT_METHOD,
        qsparse_format_version: int = CONFIG_FORMAT_VERSION,
        loading_note: str | None = None,
        **unknown: Any,
    ):
        if unknown:
            raise TypeError(
                f"unknown QSparseConfig option(s) {sorted(unknown)}; valid options are {sorted(self.option_names())}. "
                "If this comes from a checkpoint's config.json, it was written by a newer qsparse_hf: upgrade it."
            )
        if quant_method != QUANT_METHOD:
            raise ValueError(f"QSparseConfig needs quant_method={QUANT_METHOD!r}, got {quant_method!r}")
        if qsparse_format_version > CONFIG_FORMAT_VERSION:
            raise ValueError(
                f"this checkpoint's qsparse config has format version {qsparse_format_version}, newer than this "
                f"qsparse_hf understands ({CONFIG_FORMAT_VERSION}); upgrade qsparse_hf"
            )
        self.quant_method = QUANT_METHOD
        self.qsparse_format_version = CONFIG_FORMAT_VERSION
        self.loading_note = LOADING_NOTE
        self.topk = validate_topk(topk, "topk")
        self.ffn_topk = None if ffn_topk is None else validate_topk(ffn_topk, "ffn_topk")
        self.target_modules = _as_pattern_list(target_modules, "target_modules")
        self.exclude_modules = _as_pattern_list(exclude_modules, "exclude_modules") or []
        self.topk_overrides = {}
        for pattern, value in dict(topk_overrides or {}).items():
            _compile_pattern(pattern, "topk_overrides")
            self.topk_overrides[pattern] = validate_topk(value, f"topk_overrides[{pattern!r}]")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        for flag_name, flag in (("ste", ste), ("rescale", rescale), ("track_sparsity", track_sparsity)):
            if not isinstance(flag, bool):
                raise TypeError(f"{flag_name} must be True or False, got {flag!r}")
        self.ste, self.rescale, self.track_sparsity = ste, rescale, track_sparsity
        if block_size is not None:
            if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
                raise ValueError(f"block_size must be an int >= 2 (e.g. 32 for 16:32 sparsity), got {block_size!r}")
            for value in [self.topk, self.ffn_topk, *self.topk_overrides.values()]:
                if isinstance(value, int) and value > block_size:
                    raise ValueError(f"with block_size={block_size}, an int keep count must be <= {block_size}")
        self.block_size = block_size
        if weight_bits not in (None, 1.58):
            raise ValueError(f"weight_bits must be None (full precision) or 1.58 (ternary), got {weight_bits!r}")
        if activation_bits not in (None, 8):
            raise ValueError(f"activation_bits must be None or 8, got {activation_bits!r}")
        self.weight_bits, self.activation_bits = weight_bits, activation_bits

    @classmethod
    def option_names(cls) -> set[str]:
        """Names of the options accepted by ``QSparseConfig(...)`` and ``convert_to_qsparse(..., **options)``.

        Example:
            >>> "ffn_topk" in QSparseConfig.option_names()
            True
        """
        code = cls.__init__.__code__
        names = set(code.co_varnames[1 : code.co_argcount + code.co_kwonlyargcount])
        return names - {"quant_method", "qsparse_format_version", "loading_note"}

    @property
    def effective_ffn_topk(self) -> float | int:
        """The keep setting used after the FFN activation (``ffn_topk``, or ``topk`` when unset)."""
        return self.topk if self.ffn_topk is None else self.ffn_topk

    def matches(self, name: str, patterns: list[str] | None) -> str | None:
        """Return the first pattern that selects module ``name`` (dot-boundary name or full-name regex), or None.

        Example:
            >>> QSparseConfig().matches("model.layers.10.mlp.up_proj", ["layers.1", "mlp.up_proj"])
            'mlp.up_proj'
        """
        for pattern in patterns or ():
            if _pattern_matches(pattern, name):
                return pattern
        return None

    def topk_for(self, name: str) -> float | int:
        """Keep setting of the linear called ``name``: the first matching override, else ``topk``."""
        pattern = self.matches(name, list(self.topk_overrides))
        return self.topk if pattern is None else self.topk_overrides[pattern]

    def is_quantized(self) -> bool:
        """True for the BitNet b1.58 variant (ternary weights and/or 8-bit activations)."""
        return self.weight_bits is not None or self.activation_bits is not None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QSparseConfig) and self.to_dict() == other.to_dict()

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["exclude_modules"] = list(out["exclude_modules"])
        return out


def _as_pattern_list(value: list[str] | str | None, what: str) -> list[str] | None:
    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else list(value)
    for pattern in patterns:
        _compile_pattern(pattern, what)
    return patterns


def _compile_pattern(pattern: Any, what: str) -> re.Pattern:
    if not isinstance(pattern, str) or not pattern:
        raise TypeError(f"{what} entries must be non-empty strings (module names or regexes), got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{what} entry {pattern!r} is neither a module name nor a valid regex: {err}") from None


def _pattern_matches(pattern: str, name: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False
