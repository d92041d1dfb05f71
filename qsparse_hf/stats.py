"""Measured sparsity: per projection, per layer, overall, and activated parameters (the paper's Table 2 view)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from .convert import dense_matmul_modules, is_qsparse_model, qsparse_modules
from .layers import QSparseLinear

__all__ = [
    "ModuleCount",
    "SparsityReport",
    "collect_counts",
    "reset_sparsity",
    "set_sparsity_tracking",
    "sparsity_report",
    "ROLE_ORDER",
]

#: Column order of reports: attention, then FFN (``act`` is the top-K after the FFN activation).
ROLE_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "act", "down", "expert_in", "expert_act")

NOT_CONVERTED_HINT = (
    "This model has no Q-Sparse modules. If it was saved by qsparse_hf, it was loaded without the plugin: "
    "`import qsparse_hf` *before* `AutoModelForCausalLM.from_pretrained(...)`, otherwise transformers loads it dense."
)


@dataclass
class ModuleCount:
    """Zeros/elements seen by one Q-Sparse module, with what is needed to weigh it."""

    role: str
    layer: int | None
    zeros: int
    elements: int
    weight_params: int  # 0 for the FFN activation, which has no weight
    features: int = 0  # input width of a linear (0 for the FFN activation)
    #: Share of ``weight_params`` one token multiplies: 1 for a linear; for fused MoE experts, its routed experts
    #: of all experts (measured: the router's top-k of the experts seen).
    weight_share: float = 1.0

    @property
    def sparsity(self) -> float:
        return self.zeros / self.elements if self.elements else float("nan")


def collect_counts(model: nn.Module, reset: bool = False, training: bool | None = None,
                   across_processes: bool = False) -> dict[str, ModuleCount]:
    """Read every Q-Sparse module's counters with one device synchronisation (optionally resetting them).

    ``training`` picks the counts of training-mode (True) or eval-mode (False) forwards; None takes both. With
    ``across_processes`` and an initialised ``torch.distributed`` group, the counts are summed over all ranks (every
    rank must call it, as for any collective).
    """
    modules = list(qsparse_modules(model))
    counters = list({id(m.counter): m.counter for _, m in modules}.values())  # linears reading one input share one
    windows = [counter.window(training) for counter in counters]
    tensors = [t for zeros, _ in windows for t in zeros]
    device = tensors[0].device if tensors else next((p.device for p in model.parameters()), torch.device("cpu"))
    values = torch.zeros(len(counters), 2, dtype=torch.int64, device=device)
    for row, (zeros, elements) in enumerate(windows):
        for t in zeros:
            values[row, 0] += t.to(device)
        values[row, 1] = elements
    if across_processes and torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(values)
    totals = dict(zip((id(c) for c in counters), values.tolist())) if counters else {}
    counts = {}
    for name, module in modules:
        zeros, elements = totals[id(module.counter)]
        is_linear = isinstance(module, QSparseLinear)
        counts[name] = ModuleCount(
            module.role,
            module.layer_index,
            int(zeros),
            int(elements),
            module.weight.numel() if is_linear else module.weight_params,
            module.in_features if is_linear else 0,
            1.0 if is_linear else module.weight_share,
        )
    if reset:
        for counter in counters:
            counter.reset(training)
    return counts


def reset_sparsity(model: nn.Module) -> None:
    """Zero the sparsity counters of every Q-Sparse module."""
    for _, module in qsparse_modules(model):
        module.counter.reset()


def set_sparsity_tracking(model: nn.Module, enabled: bool) -> None:
    """Turn sparsity measurement on or off for every Q-Sparse module (off saves one reduction per input).

    Example:
        >>> set_sparsity_tracking(model, False)  # doctest: +SKIP
    """
    for _, module in qsparse_modules(model):
        module.counter.enabled = enabled


def _role_key(role: str) -> tuple[int, str]:
    return (ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER), role)


@dataclass
class SparsityReport:
    """Measured sparsity of a Q-Sparse model over the tokens it has processed.

    Attributes:
        per_projection: fraction of zeros in the input of each projection kind (``q``, ``k``, ``v``, ``o``,
            ``gate``, ``up``, ``down``) and in the FFN activation output (``act``), over all layers.
        per_layer: the same, per decoder layer.
        overall: parameter-weighted sparsity of the converted linears: ``1 − activated / total`` over them.
        activated_params: weights actually multiplied per token: each converted linear counts
            ``weight.numel() · (1 − its input sparsity)``; matmuls left dense (``lm_head``, routers, fused MoE
            experts: see ``dense_parts``) count fully.
            Embedding tables are not counted (a lookup reads one row).
        linear_params: all linear weights (converted and dense), the denominator of ``activated_fraction``.
        tokens: token vectors seen by the first converted linear.
    """

    per_projection: dict[str, float]
    per_layer: dict[int, dict[str, float]]
    overall: float
    activated_params: int
    linear_params: int
    tokens: int
    extra: dict[str, Any] = field(default_factory=dict)
    #: Matrix weights multiplied dense for every token, by module type (lm_head's ``Linear``, MoE experts, ...).
    dense_parts: dict[str, int] = field(default_factory=dict)

    @property
    def activated_fraction(self) -> float:
        return self.activated_params / self.linear_params if self.linear_params else float("nan")

    @classmethod
    def from_counts(cls, counts: Mapping[str, ModuleCount], dense_linear_params: int) -> "SparsityReport":
        """Build a report from `collect_counts` output (possibly summed over several windows)."""
        by_role: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        by_layer: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        converted = activated = 0.0
        tokens = 0
        for count in counts.values():
            if count.elements == 0:
                continue
            by_role[count.role][0] += count.zeros
            by_role[count.role][1] += count.elements
            if count.layer is not None:
                by_layer[count.layer][count.role][0] += count.zeros
                by_layer[count.layer][count.role][1] += count.elements
            if count.weight_params:
                converted += count.weight_params
                activated += count.weight_params * count.weight_share * (1.0 - count.sparsity)
                if not tokens and count.features:
                    tokens = count.elements // count.features
        if not by_role:
            raise ValueError(
                "no tokens have been counted since the last reset: run the model on some text first, or pass "
                "input_ids to sparsity_report(model, input_ids). (Is sparsity tracking switched off?)"
            )
        ordered = sorted(by_role, key=_role_key)
        return cls(
            per_projection={role: by_role[role][0] / by_role[role][1] for role in ordered},
            per_layer={
                layer: {role: z / n for role, (z, n) in sorted(roles.items(), key=lambda kv: _role_key(kv[0]))}
                for layer, roles in sorted(by_layer.items())
            },
            overall=1.0 - activated / converted if converted else float("nan"),
            activated_params=int(round(activated + dense_linear_params)),
            linear_params=int(converted + dense_linear_params),
            tokens=tokens,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (for ``--json`` outputs and model cards)."""
        return {
            "per_projection": self.per_projection,
            "per_layer": {str(k): v for k, v in self.per_layer.items()},
            "overall": self.overall,
            "activated_params": self.activated_params,
            "linear_params": self.linear_params,
            "activated_fraction": self.activated_fraction,
            "tokens": self.tokens,
            "dense_parts": self.dense_parts,
        }

    def to_logs(self, per_layer: bool = False) -> dict[str, float]:
        """Flat ``{"sparsity/q_proj": ..., "sparsity/overall": ..., "activated_params": ...}`` for loggers."""
        logs = {f"sparsity/{_metric_name(role)}": value for role, value in self.per_projection.items()}
        logs["sparsity/overall"] = self.overall
        logs["activated_params"] = float(self.activated_params)
        logs["activated_fraction"] = self.activated_fraction
        if per_layer:
            for layer, roles in self.per_layer.items():
                for role, value in roles.items():
                    logs[f"sparsity/layer_{layer}/{_metric_name(role)}"] = value
        return logs

    def markdown(self) -> str:
        """The Table-2 row as a Markdown table (projections, overall, activated parameters)."""
        roles = list(self.per_projection)
        head = "| " + " | ".join([*roles, "overall", "activated params"]) + " |"
        rule = "|" + "---|" * (len(roles) + 2)
        cells = [f"{100 * self.per_projection[r]:.1f}%" for r in roles]
        cells += [f"{100 * self.overall:.1f}%", f"{_human(self.activated_params)} ({100 * self.activated_fraction:.1f}%)"]
        return "\n".join([head, rule, "| " + " | ".join(cells) + " |"])

    def _repr_markdown_(self) -> str:
        """Jupyter renders a report as its tables (projections, then layers), with what was left dense."""
        lines = [f"**Q-Sparse sparsity** (fraction of zeros in each projection's input, over {self.tokens} tokens)",
                 "", self.markdown()]
        if self.per_layer:
            roles = list(self.per_projection)
            lines += ["", "| layer | " + " | ".join(roles) + " |", "|" + "---|" * (len(roles) + 1)]
            for layer, values in self.per_layer.items():
                cells = [f"{100 * values[r]:.1f}%" if r in values else "–" for r in roles]
                lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        if self.dense_parts:
            parts = ", ".join(f"{kind} {_human(n)}" for kind, n in sorted(self.dense_parts.items()))
            lines += ["", f"Left dense (counted in full): {parts}"]
        return "\n".join(lines)

    def __str__(self) -> str:
        lines = ["Q-Sparse sparsity (fraction of zeros in each projection's input)", self.markdown()]
        if self.per_layer:
            roles = list(self.per_projection)
            lines.append("")
            lines.append("layer " + " ".join(f"{r:>7}" for r in roles))
            for layer, values in self.per_layer.items():
                cells = [f"{100 * values[r]:6.1f}%" if r in values else "      -" for r in roles]
                lines.append(f"{layer:>5} " + " ".join(cells))
        lines.append(
            f"activated linear params: {_human(self.activated_params)} of {_human(self.linear_params)} "
            f"({100 * self.activated_fraction:.1f}%), over {self.tokens} tokens"
        )
        if self.dense_parts:
            parts = ", ".join(f"{kind} {_human(n)}" for kind, n in sorted(self.dense_parts.items()))
            lines.append(f"left dense (counted in full): {parts}")
        return "\n".join(lines)


_PROJ_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
               "down": "down_proj", "act": "ffn_act", "qkv": "qkv_proj", "gate_up": "gate_up_proj",
               "expert_in": "experts_input", "expert_act": "experts_act"}


def _metric_name(role: str) -> str:
    return _PROJ_NAMES.get(role, role)


def _human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def dense_linear_params(model: nn.Module) -> int:
    """Matrix weights left dense and multiplied for every token: ``lm_head`` by default, and whatever the
    conversion could not sparsify (routers and fused MoE experts, counted in full; see
    `qsparse_hf.convert.dense_matmul_modules`)."""
    return sum(weights for _, _, weights in dense_matmul_modules(model))


def sparsity_report(model: nn.Module, input_ids: torch.Tensor | Mapping[str, torch.Tensor] | None = None) -> SparsityReport:
    """Per-projection and per-layer sparsity, overall sparsity and activated parameters of a Q-Sparse model.

    Without ``input_ids`` it reports what the model has processed since the last `reset_sparsity` (e.g. during
    training). With ``input_ids`` (a tensor, or a dict of model inputs) it resets the counters, runs one forward
    pass without gradients and reports on those tokens.

    Example:
        >>> report = sparsity_report(model, tokenizer("some text", return_tensors="pt").input_ids)  # doctest: +SKIP
        >>> report.per_projection["down"], report.activated_fraction                                # doctest: +SKIP
    """
    if not is_qsparse_model(model):
        raise ValueError(NOT_CONVERTED_HINT)
    if input_ids is not None:
        reset_sparsity(model)
        inputs = dict(input_ids) if isinstance(input_ids, Mapping) else {"input_ids": input_ids}
        device = next(model.parameters()).device
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            model.train(was_training)
    counts = collect_counts(model)
    report = SparsityReport.from_counts(counts, dense_linear_params(model))
    report.dense_parts = dense_parts(model)
    return report


def dense_parts(model: nn.Module) -> dict[str, int]:
    """Matrix weights left dense, by module type (``{"Linear": ..., "MixtralExperts": ...}``)."""
    parts: dict[str, int] = defaultdict(int)
    for _, module, weights in dense_matmul_modules(model):
        parts[type(module).__name__] += weights
    return dict(parts)
