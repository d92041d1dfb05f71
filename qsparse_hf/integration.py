"""Registration with transformers' quantizer registry, so ``from_pretrained`` re-applies Q-Sparse.

The quantizer is a thin lifecycle shell: everything it does is `convert_to_qsparse` before the weights load
(the checkpoint keys are those of plain linears, so loading itself is untouched).
"""

from __future__ import annotations

import functools

from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from .attention import register_attention
from .config import LOADING_NOTE, QUANT_METHOD, QSparseConfig

__all__ = ["QSparseHfQuantizer", "register"]


class QSparseHfQuantizer(HfQuantizer):
    """Converts a model to Q-Sparse while ``from_pretrained`` builds it.

    Used in two ways: loading a qsparse checkpoint (its ``config.json`` holds ``quant_method: "qsparse"``), and
    ``from_pretrained(dense_model, quantization_config=QSparseConfig(...))`` to convert while loading.

    Example:
        >>> import qsparse_hf                                                         # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained("path/to/qsparse-checkpoint")       # doctest: +SKIP
    """

    requires_calibration = False
    quantization_config: QSparseConfig

    def _process_model_before_weight_loading(self, model, **kwargs):
        from .convert import convert_to_qsparse

        convert_to_qsparse(model, config=self.quantization_config)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        self.mark_model(model)
        return model

    @staticmethod
    def mark_model(model) -> None:
        """Set the attributes transformers and its Trainer read on quantized models."""
        model.is_quantized = True
        model.quantization_method = QUANT_METHOD
        for module in model.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "to_dict"):
                config._is_quantized = True
        if hasattr(model, "add_model_tags"):
            model.add_model_tags(["qsparse"])
        if hasattr(model, "push_to_hub"):  # upload the Q-Sparse card, not transformers' generic template
            from .hub import push_to_hub_with_card

            # A partial rather than a bound method: it pickles by reference to the function, so a whole converted
            # model survives torch.save / torch.load (a bound method is looked up by its name on the model).
            model.push_to_hub = functools.partial(push_to_hub_with_card, model)

    def _dequantize(self, model, dtype=None):
        from .convert import revert_qsparse

        return revert_qsparse(model)

    def get_state_dict_and_metadata(self, model):
        # The safetensors header carries the config and the loading note too, for tools that read only weights.
        return None, {"qsparse_config": self.quantization_config.to_json_string(), "qsparse_note": LOADING_NOTE}

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        # Full finetuning (no adapters) is the paper's setting; Trainer asks this before allowing it.
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def register() -> None:
    """Register ``quant_method="qsparse"`` and the ``"qsparse_sdpa"`` attention (`attention.register_attention`) with
    transformers (idempotent; done on ``import qsparse_hf``).

    Example:
        >>> register(); register()  # safe to call twice
    """
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not QSparseConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = QSparseConfig
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not QSparseHfQuantizer:
        AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = QSparseHfQuantizer
    register_attention()
