"""Quantized Q-Sparse (BitNet b1.58 + top-K), Block Q-Sparse and the packed ternary export."""

import pytest
import torch
from conftest import fixture_path, tiny_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from qsparse_hf import QSparseCallback, QSparseLinear, convert_to_qsparse, sparsity_report
from qsparse_hf import functional as QF
from qsparse_hf.export import load_packed_ternary, pack_ternary, save_packed_ternary, unpack_ternary


def _quantized(arch="mistral", **kw):
    return convert_to_qsparse(tiny_model(arch), topk=0.5, weight_bits=1.58, activation_bits=8, **kw)


def test_effective_weight_is_ternary_and_input_is_on_8bit_grid():
    model = _quantized()
    q_proj = model.model.layers[0].self_attn.q_proj
    weight = q_proj.effective_weight().detach()
    alpha = q_proj.weight.detach().abs().mean()
    assert set(torch.unique(weight).tolist()) == {-alpha.item(), 0.0, alpha.item()}
    seen = []
    q_proj.register_forward_hook(lambda mod, args, out: seen.append(mod.sparsifier(args[0])))
    with torch.no_grad():
        model(torch.randint(3, 128, (2, 8)))
    x_sparse = seen[0]
    assert ((x_sparse != 0).sum(-1) == 32).all()
    # Kept entries lie on each token's absmax 8-bit grid; the scale is set by the token's largest |x|.
    scale = 127 / x_sparse.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(x_sparse * scale, (x_sparse * scale).round(), atol=1e-3, rtol=0)


def test_gradients_flow_through_both_quantizers_and_topk():
    model = _quantized().train()
    ids = torch.randint(3, 128, (2, 8))
    model(ids, labels=ids).loss.backward()
    grads = [m.weight.grad for m in model.modules() if isinstance(m, QSparseLinear)]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_quantized_round_trip_trainer_and_callback(tmp_path):
    ids = torch.randint(3, 128, (2, 8))
    model = _quantized("qwen3")
    data = [{"input_ids": x, "labels": x} for x in torch.randint(3, 128, (8, 12))]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True)
    trainer = Trainer(model=model.train(), args=args, train_dataset=data, callbacks=[QSparseCallback()])
    trainer.train()
    assert "sparsity/q_proj" in trainer.state.log_history[0]
    model.eval().save_pretrained(tmp_path / "ckpt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert reloaded.config.quantization_config.weight_bits == 1.58
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_pack_unpack_round_trip_odd_widths():
    codes = torch.randint(-1, 2, (7, 13))
    assert torch.equal(unpack_ternary(pack_ternary(codes), 13), codes.to(torch.int8))
    assert pack_ternary(codes).shape == (7, 4)
    with pytest.raises(ValueError, match="-1, 0, 1"):
        pack_ternary(torch.tensor([2]))


def test_packed_export_reloads_identical_logits_and_is_small(tmp_path):
    ids = torch.randint(3, 128, (2, 8))
    model = _quantized("llama").eval()
    sizes = save_packed_ternary(model, tmp_path)
    reloaded = load_packed_ternary(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert sizes["packed_bytes"] < sizes["bf16_bytes"]
    with pytest.raises(ValueError, match="weight_bits=1.58"):
        save_packed_ternary(convert_to_qsparse(tiny_model(), topk=0.5), tmp_path / "x")


def test_packed_export_of_the_fixture_model_is_several_times_smaller(tmp_path):
    path = fixture_path("mistral-tiny")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    convert_to_qsparse(model, topk=0.7, weight_bits=1.58, activation_bits=8)
    sizes = save_packed_ternary(model, tmp_path)
    # Converted linear weights shrink 8x (16 -> 2 bits); embeddings and the dense lm_head stay bf16.
    ternary = sum(m.weight.numel() for m in model.modules() if isinstance(m, QSparseLinear))
    expected = sizes["bf16_bytes"] - 2 * ternary + ternary / 4
    assert sizes["packed_bytes"] == pytest.approx(expected, rel=0.01)
    assert sizes["packed_bytes"] < 0.55 * sizes["bf16_bytes"]
    ids = torch.tensor([[40, 300, 1200, 77, 5]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, load_packed_ternary(tmp_path, dtype=torch.bfloat16)(ids).logits)


def test_block_qsparse_keeps_n_per_block_and_reports_it():
    model = convert_to_qsparse(tiny_model(), topk=0.5, block_size=16)
    report = sparsity_report(model, torch.randint(3, 128, (2, 8)))
    assert report.per_projection["q"] == pytest.approx(0.5)
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, o: seen.append(m.sparsifier(a[0])))
    with torch.no_grad():
        model(torch.randint(3, 128, (1, 4)))
    assert ((seen[0].reshape(1, 4, -1, 16) != 0).sum(-1) <= QF.keep_count(0.5, 16)).all()
