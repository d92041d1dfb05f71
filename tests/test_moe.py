"""Q-Sparse for MoE models: fused experts (transformers 5's 3-D expert weights) sparsified, routers dense and named."""

import warnings

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    GptOssConfig,
    MixtralConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

import qsparse_hf
from qsparse_hf import convert_to_qsparse, revert_qsparse, sparsity_report
from qsparse_hf import functional as QF
from qsparse_hf.layers import QSparseExpertInput

_T = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
          max_position_embeddings=64)
MOE_CONFIGS = {
    "mixtral": lambda: MixtralConfig(**_T, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: Qwen2MoeConfig(**_T, intermediate_size=96, moe_intermediate_size=48,
                                        shared_expert_intermediate_size=96, num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": lambda: Qwen3MoeConfig(**_T, intermediate_size=96, moe_intermediate_size=48, num_experts=4,
                                        num_experts_per_tok=2, head_dim=16),
    "deepseek_v3": lambda: DeepseekV3Config(**_T, intermediate_size=96, moe_intermediate_size=48, n_routed_experts=4,
                                            num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                                            q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                            v_head_dim=16, rope_scaling=None),
    "gpt_oss": lambda: GptOssConfig(**_T, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
                                    head_dim=16, layer_types=["full_attention"] * 2),
}


def _moe(arch):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(MOE_CONFIGS[arch]()).eval()


def _experts(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, "qsparse_input", None), QSparseExpertInput)]


@pytest.mark.parametrize("arch", sorted(MOE_CONFIGS))
def test_fused_experts_read_top_k_inputs_and_routers_stay_dense_by_name(arch):
    model = _moe(arch)
    ids = torch.randint(3, 128, (2, 7))
    with torch.no_grad():
        dense = model(ids).logits
    with pytest.warns(UserWarning, match=r"Router.*routers are kept dense on purpose"):
        convert_to_qsparse(model, topk=0.5)
    experts = _experts(model)
    assert experts, "no fused experts were converted"
    seen = {}
    def record(name):
        def hook(module, args):  # runs after the Q-Sparse pre-hook, so it sees what the experts read
            seen.setdefault(name, args[0].clone())
        return hook

    for name, module in experts:  # the experts' input has exactly K non-zeros per token
        module.register_forward_pre_hook(record(name))
    report = sparsity_report(model, ids)
    hidden = model.config.hidden_size
    for name, x in seen.items():
        assert ((x != 0).sum(-1) == QF.keep_count(0.5, hidden)).all(), name
    assert report.per_projection["expert_in"] == pytest.approx(0.5)
    assert report.per_projection["expert_act"] == pytest.approx(0.5, abs=0.02)
    # Nothing but routers and the excluded lm_head is dense, and the fused experts are not listed as dense.
    assert all("Router" in kind or kind == "Linear" for kind in report.dense_parts), report.dense_parts
    assert report.dense_parts.get("Linear", 0) == model.get_output_embeddings().weight.numel()
    # Activated parameters: each token multiplies its top-k experts' weights, at the measured input sparsity.
    top_k, n_experts = model.config.num_experts_per_tok, experts[0][1].qsparse_input.num_experts
    stacked = sum(p.numel() for _, m in experts for p in m.parameters(recurse=False) if p.dim() == 3)
    linears = [m for m in model.modules() if isinstance(m, qsparse_hf.QSparseLinear)]
    expected = (sum(report.dense_parts.values()) + 0.5 * sum(m.weight.numel() for m in linears)
                + top_k / n_experts * stacked * 0.5)
    assert report.activated_params == pytest.approx(expected, rel=0.01)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, dense, atol=1e-3)
    revert_qsparse(model)
    assert not _experts(model) and not qsparse_hf.is_qsparse_model(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_keep_everything_equals_dense_and_training_reaches_the_experts(arch):
    model = _moe(arch)
    ids = torch.randint(3, 128, (2, 7))
    with torch.no_grad():
        dense = model(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_to_qsparse(model, topk=1.0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense)
    model = _moe(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_to_qsparse(model, topk=0.5).train()
    model(ids, labels=ids).loss.backward()
    name, experts = _experts(model)[0]
    grads = [p.grad for p in experts.parameters(recurse=False) if p.dim() == 3]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name


def test_a_saved_moe_checkpoint_reloads_sparse(tmp_path):
    model = _moe("qwen3_moe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_to_qsparse(model, topk=0.5)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert len(_experts(reloaded)) == len(_experts(model))
    ids = torch.randint(3, 128, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_excluded_experts_stay_dense_and_are_counted_so():
    model = _moe("mixtral")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_to_qsparse(model, topk=0.5, exclude_modules=["lm_head", "experts"])
    assert not _experts(model)
    report = sparsity_report(model, torch.randint(3, 128, (1, 6)))
    experts = model.model.layers[0].mlp.experts
    assert report.dense_parts["MixtralExperts"] == 2 * sum(p.numel() for p in experts.parameters())
    assert "expert_in" not in report.per_projection
