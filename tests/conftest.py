"""Shared test helpers: tiny random configs, fixture paths, seeding and skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernels run on CPU through Triton's interpreter; it must be chosen before any kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# GPU runs of the tests tune their own launches rather than read or add to the user's cache (tests/test_tuning.py
# points it at temporary files).
os.environ.setdefault("QSPARSE_TUNING_CACHE", "0")
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    GPTNeoXConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    OlmoConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    StableLmConfig,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("QSPARSE_FIXTURES", REPO.parent / "shared" / "fixtures"))
EMBEDDED_MODEL = REPO / "examples" / "models" / "mistral-micro"

_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, bos_token_id=1,
             eos_token_id=2, pad_token_id=0)

#: One tiny random config per architecture family we claim to support; stablelm exercises the generic path.
TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_TINY),
    "mistral": lambda: MistralConfig(**_TINY),
    "qwen2": lambda: Qwen2Config(**_TINY),  # biased q/k/v
    "qwen3": lambda: Qwen3Config(**_TINY, head_dim=16),  # q/k norms
    "phi3": lambda: Phi3Config(**_TINY),  # fused qkv / gate_up
    "gemma": lambda: GemmaConfig(**_TINY, head_dim=16),  # GELU-tanh gate, scaled embeddings
    "gemma2": lambda: Gemma2Config(**_TINY, head_dim=16),  # logit soft-capping, sandwich norms, sliding window
    "olmo": lambda: OlmoConfig(**_TINY),  # parameter-free layer norms
    "olmo2": lambda: Olmo2Config(**_TINY),  # norms after attention and FFN, q/k norms over all heads
    "granite": lambda: GraniteConfig(**_TINY),  # embedding, residual, attention and logit multipliers
    # Not in ARCHITECTURES, so they go through the generic path: stablelm with Llama's names, GPT-NeoX with its own
    # (query_key_value, dense, dense_h_to_4h / dense_4h_to_h) and a non-gated GELU FFN.
    "stablelm": lambda: StableLmConfig(**_TINY),
    "gpt_neox": lambda: GPTNeoXConfig(**{k: v for k, v in _TINY.items() if k != "num_key_value_heads"}),
}


def tiny_model(arch: str = "mistral", seed: int = 0) -> torch.nn.Module:
    """A small random causal LM of the given family, in float32, eval mode."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]()).eval()


def embedded_sparse_model_and_prompt(device: str = "cpu", topk: float = 0.5, tokens: int = 48):
    """The embedded mistral-micro in bf16 on ``device``, converted at ``topk``, and the first ``tokens`` tokens of
    the shipped sample text as a prompt."""
    from transformers import AutoTokenizer

    from qsparse_hf import convert_to_qsparse

    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL, dtype=torch.bfloat16).to(device).eval()
    convert_to_qsparse(model, topk=topk)
    text = (EMBEDDED_MODEL.parents[1] / "data" / "sample_text.txt").read_text()
    prompt = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)(text, return_tensors="pt").input_ids[:, :tokens]
    return model, prompt.to(device)


def fixture_path(name: str) -> Path:
    """Path of a model or file in ../shared/fixtures, skipping the test cleanly when it is absent."""
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"fixture {path} not found (set QSPARSE_FIXTURES to the shared fixtures folder)")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def heldout_text() -> str:
    return fixture_path("heldout_text.txt").read_text()[:20000]


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
#: Where the Triton kernels run in this session: the GPU, else Triton's CPU interpreter.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sparse_llama():
    """The tiny Llama in bf16 on `KERNEL_DEVICE`, converted at keep 0.5."""
    from qsparse_hf import convert_to_qsparse

    return convert_to_qsparse(tiny_model("llama").to(KERNEL_DEVICE, torch.bfloat16), topk=0.5)


def silu_reference(gate: torch.Tensor) -> torch.Tensor:
    """``F.silu`` as the kernel computes it: on the GPU PyTorch's own; in Triton's interpreter, which has NumPy's
    ``exp`` rather than CUDA's, the same formula with NumPy (PyTorch's CPU ``exp`` may differ in the last bit)."""
    if gate.is_cuda:
        return torch.nn.functional.silu(gate)
    import numpy as np

    value = gate.float().numpy()
    with np.errstate(over="ignore"):
        return torch.from_numpy(value / (np.float32(1) + np.exp(-value))).to(gate.dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns, any NaN equal to any NaN (and -0.0 told from 0.0)."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan].view(torch.int16), b[~nan].view(torch.int16))
