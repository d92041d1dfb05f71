"""Inference export of quantized Q-Sparse models: ternary weights packed 2 bits each, plus one scale per linear."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import QSparseConfig
from .convert import convert_to_qsparse, qsparse_modules
from .functional import ternary_codes
from .saving import write_directory_atomic
from .layers import QSparseLinear

__all__ = ["pack_ternary", "unpack_ternary", "save_packed_ternary", "load_packed_ternary"]

PACKED_MARKER = "qsparse_packed.json"
_WEIGHTS = "model.safetensors"


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Pack a tensor of {−1, 0, 1} (last dim any size) into uint8, four values per byte, 2 bits each.

    Example:
        >>> pack_ternary(torch.tensor([[-1, 0, 1, 1, -1]]))
        tensor([[164,   0]], dtype=torch.uint8)
    """
    if codes.numel() and (codes.abs() > 1).any():
        raise ValueError("pack_ternary expects values in {-1, 0, 1}")
    width = codes.shape[-1]
    padded = torch.nn.functional.pad(codes.to(torch.int16) + 1, (0, (-width) % 4))  # pad code 0 == value -1, cut later
    groups = padded.reshape(*codes.shape[:-1], -1, 4).to(torch.uint8)
    return groups[..., 0] | (groups[..., 1] << 2) | (groups[..., 2] << 4) | (groups[..., 3] << 6)


def unpack_ternary(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of `pack_ternary`: int8 tensor of {−1, 0, 1} with last dimension ``width``.

    Example:
        >>> unpack_ternary(pack_ternary(torch.tensor([[-1, 0, 1, 1, -1]])), 5)
        tensor([[-1,  0,  1,  1, -1]], dtype=torch.int8)
    """
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & 3
    return (codes.reshape(*packed.shape[:-1], -1)[..., :width].to(torch.int8) - 1)


def save_packed_ternary(model, save_directory: str | os.PathLike, tokenizer=None) -> dict[str, int]:
    """Write a 1.58-bit Q-Sparse model for inference: packed ternary weights, scales, the rest as stored.

    Returns the byte sizes written (``packed_bytes``) and what a bf16 copy of the same tensors would take
    (``bf16_bytes``). Load it back with `load_packed_ternary`.

    Example:
        >>> save_packed_ternary(convert_to_qsparse(model, topk=0.7, weight_bits=1.58), "out")  # doctest: +SKIP
        {'packed_bytes': ..., 'bf16_bytes': ...}
    """
    cfg = getattr(model.config, "quantization_config", None)
    if not isinstance(cfg, QSparseConfig) or cfg.weight_bits != 1.58:
        raise ValueError("save_packed_ternary needs a model converted with weight_bits=1.58")
    tensors: dict[str, torch.Tensor] = {}
    packed_names = set()
    for name, module in qsparse_modules(model):
        if isinstance(module, QSparseLinear):
            codes, alpha = ternary_codes(module.weight.detach())
            tensors[f"{name}.weight_packed"] = pack_ternary(codes).cpu()
            tensors[f"{name}.weight_scale"] = alpha.reshape(1).cpu()
            packed_names.add(f"{name}.weight")
    seen_storage = set()
    bf16_bytes = 0
    for key, value in model.state_dict().items():
        bf16_bytes += value.numel() * 2 if value.is_floating_point() else value.numel() * value.element_size()
        if key in packed_names:
            continue
        pointer = value.untyped_storage().data_ptr()
        if pointer in seen_storage:  # tied weights (lm_head = embed_tokens) are stored once
            continue
        seen_storage.add(pointer)
        tensors[key] = value.detach().cpu().contiguous()

    def write(out: Path) -> int:
        save_file(tensors, str(out / _WEIGHTS), metadata={"format": "pt", "qsparse": "ternary-2bit"})
        model.config.save_pretrained(out)
        (out / PACKED_MARKER).write_text(json.dumps({"format": "ternary-2bit", "packed": sorted(packed_names)},
                                                    indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        return (out / _WEIGHTS).stat().st_size

    # All-or-nothing: an interrupted export never leaves a config beside other weights.
    packed_bytes = write_directory_atomic(save_directory, write)
    return {"packed_bytes": packed_bytes, "bf16_bytes": bf16_bytes}


def load_packed_ternary(directory: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load a `save_packed_ternary` export: a Q-Sparse model whose ternary linears hold their codes and scales.

    Example:
        >>> model = load_packed_ternary("out")  # doctest: +SKIP
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    if not (directory / PACKED_MARKER).exists():
        raise ValueError(f"{directory} is not a packed ternary export (no {PACKED_MARKER}); use from_pretrained")
    config = AutoConfig.from_pretrained(directory)
    qsparse_config = config.quantization_config
    if isinstance(qsparse_config, dict):
        qsparse_config = QSparseConfig.from_dict(qsparse_config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    convert_to_qsparse(model, config=qsparse_config)
    tensors = load_file(str(directory / _WEIGHTS))
    unpacked = set()
    for name, module in qsparse_modules(model):
        if isinstance(module, QSparseLinear):
            codes = unpack_ternary(tensors.pop(f"{name}.weight_packed"), module.in_features)
            module.weight.data = codes.to(dtype)
            module.register_buffer("weight_scale", tensors.pop(f"{name}.weight_scale").reshape(()), persistent=False)
            unpacked.add(f"{name}.weight")
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # The unpacked weights were set above; a tied lm_head is restored by tie_weights() below.
    missing = [k for k in missing if k not in unpacked and "lm_head" not in k]
    if unexpected or missing:
        raise ValueError(f"export does not match the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()
