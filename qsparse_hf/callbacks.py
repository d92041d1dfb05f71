"""`QSparseCallback`: measured sparsity and activated parameters in the Trainer's logs, and a heatmap at the end."""

from __future__ import annotations

import logging
import os
import sys

from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

from .convert import is_qsparse_model
from .stats import NOT_CONVERTED_HINT, ModuleCount, SparsityReport, collect_counts, dense_linear_params

__all__ = ["QSparseCallback", "plot_sparsity_heatmap"]

logger = logging.getLogger(__name__)

HEATMAP_FILENAME = "qsparse_sparsity.png"


class QSparseCallback(TrainerCallback):
    """Log Q-Sparse sparsity with every Trainer log: ``sparsity/q_proj`` … ``sparsity/down_proj``,
    ``sparsity/ffn_act``, ``sparsity/overall``, ``activated_params`` and ``activated_fraction``.

    Values cover the tokens processed since the previous log, counted over all processes (DDP/FSDP ranks). Logs
    of an evaluation carry the evaluation's own numbers under ``eval_sparsity/...`` (training forwards and
    evaluation forwards are counted apart). They land in ``trainer.state.log_history`` and in
    every reporting integration (TensorBoard, W&B, ...): the callback moves itself ahead of them so they see the
    values. At the end of training a layer × projection heatmap is saved as ``qsparse_sparsity.png`` in
    ``output_dir`` (over the whole run).

    Args:
        per_layer: also log ``sparsity/layer_{i}/{proj}``.
        heatmap: save the PNG heatmap at the end of training.

    Example:
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[QSparseCallback()])  # doctest: +SKIP
    """

    def __init__(self, per_layer: bool = False, heatmap: bool = True) -> None:
        self.per_layer = per_layer
        self.heatmap = heatmap
        self._totals: dict[str, ModuleCount] = {}
        self.last_report: SparsityReport | None = None

    # -- ordering -----------------------------------------------------------------------------------------------
    def _move_ahead_of_reporters(self) -> None:
        # Trainer puts user callbacks after TensorBoard/W&B, which would then log before we add our values. The
        # handler calling us is the caller's frame; moving ourselves earlier in its list while it iterates neither
        # skips nor repeats a callback (everything between shifts one place right, behind the cursor).
        frame = sys._getframe(2)
        handler = frame.f_locals.get("self")
        if not isinstance(handler, CallbackHandler) or self not in handler.callbacks:
            return
        callbacks = handler.callbacks
        callbacks.remove(self)
        position = next((i + 1 for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), 0)
        callbacks.insert(position, self)

    def on_init_end(self, args, state, control, **kwargs):
        self._move_ahead_of_reporters()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._move_ahead_of_reporters()
        if model is not None and not is_qsparse_model(model):
            raise ValueError(f"QSparseCallback: {NOT_CONVERTED_HINT}")
        self._totals = {}
        if model is not None:
            collect_counts(model, reset=True)

    # -- logging ------------------------------------------------------------------------------------------------
    def _drain(self, model, training: bool = True) -> dict[str, ModuleCount]:
        window = collect_counts(model, reset=True, training=training, across_processes=True)
        if not training:
            return window
        for name, count in window.items():
            total = self._totals.get(name)
            if total is None:
                self._totals[name] = ModuleCount(**vars(count))
            else:
                total.zeros += count.zeros
                total.elements += count.elements
        return window

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if model is None or logs is None or not is_qsparse_model(model):
            return
        # An evaluation's log carries eval_* metrics: report what the eval-mode forwards counted, under eval_ keys
        # (TensorBoard then files them under eval/, not train/). Training logs report training-mode forwards only.
        evaluation = any(key.startswith("eval_") for key in logs)
        window = self._drain(model, training=not evaluation)
        if not any(c.elements for c in window.values()):
            return
        report = SparsityReport.from_counts(window, dense_linear_params(model))
        values = report.to_logs(per_layer=self.per_layer)
        if evaluation:
            values = {f"eval_{key}": value for key, value in values.items()}
        else:
            self.last_report = report
        logs.update(values)
        # Trainer appended its copy of `logs` to log_history just before calling on_log.
        if state.log_history and all(k in state.log_history[-1] for k in logs if k not in values):
            state.log_history[-1].update(values)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is None or not is_qsparse_model(model):
            return
        self._drain(model)
        if not self.heatmap or not state.is_world_process_zero:
            return
        if not any(c.elements for c in self._totals.values()):
            logger.warning("QSparseCallback: no tokens were counted during training; no heatmap written")
            return
        report = SparsityReport.from_counts(self._totals, dense_linear_params(model))
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, HEATMAP_FILENAME)
        plot_sparsity_heatmap(report, path)
        logger.info("QSparseCallback: sparsity heatmap written to %s", path)


def plot_sparsity_heatmap(report: SparsityReport, path: str, title: str | None = None) -> str:
    """Save a layer × projection heatmap of measured sparsity as a PNG and return its path.

    Example:
        >>> plot_sparsity_heatmap(sparsity_report(model, input_ids), "sparsity.png")  # doctest: +SKIP
        'sparsity.png'
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not report.per_layer:
        raise ValueError("the report has no per-layer values (no module name carried a layer index)")
    roles = list(report.per_projection)
    layers = list(report.per_layer)
    grid = [[100 * report.per_layer[layer].get(role, float("nan")) for role in roles] for layer in layers]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(roles), 1.2 + 0.35 * len(layers)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(roles)), roles)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("projection input")
    ax.set_ylabel("layer")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", color="w" if value < 60 else "k", fontsize=7)
    fig.colorbar(image, ax=ax, label="sparsity (%)")
    ax.set_title(title or f"Q-Sparse sparsity, overall {100 * report.overall:.1f}%")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
