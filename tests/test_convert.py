"""convert_to_qsparse on every supported family (tiny random configs): wiring, exactness and errors."""

import copy

import pytest
import torch
from conftest import TINY_CONFIGS, tiny_model
from torch import nn

import qsparse_hf
from qsparse_hf import QSparseActivation, QSparseConfig, QSparseLinear, convert_to_qsparse, revert_qsparse
from qsparse_hf import functional as QF
from qsparse_hf.convert import GENERIC_LAYOUT, layout_for

ARCHS = list(TINY_CONFIGS)
EXPECTED_ROLES = {
    "phi3": {"qkv", "o", "gate_up", "down"},
    "gpt_neox": {"qkv", "o", "up", "down"},
}


def _ids(batch=2, seq=12, vocab=128):
    return torch.randint(3, vocab, (batch, seq))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_linear_but_lm_head_is_converted(arch):
    model = tiny_model(arch)
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    convert_to_qsparse(model, topk=0.5)
    converted = {n: m for n, m in model.named_modules() if isinstance(m, QSparseLinear)}
    assert set(converted) == {n for n in linears if not n.endswith("lm_head")}
    assert type(model.lm_head) is nn.Linear
    roles = {m.role for m in converted.values()}
    assert roles == EXPECTED_ROLES.get(arch, {"q", "k", "v", "o", "gate", "up", "down"})
    assert all(m.layer_index in (0, 1) for m in converted.values())
    gated = arch != "gpt_neox"
    assert any(isinstance(m, QSparseActivation) for m in model.modules()) == gated


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_keys_and_parameters_are_unchanged(arch):
    model = tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert_to_qsparse(model, topk=0.5)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("arch", ARCHS)
def test_topk_one_is_bit_identical_and_lower_topk_is_not(arch):
    ids = _ids()
    model = tiny_model(arch)
    with torch.no_grad():
        dense = model(ids).logits
        convert_to_qsparse(model, topk=1.0)
        assert torch.equal(model(ids).logits, dense)
        sparse = convert_to_qsparse(revert_qsparse(model), topk=0.5)(ids).logits
    assert not torch.allclose(sparse, dense)


def test_every_family_in_the_architecture_table_has_a_tiny_model():
    from qsparse_hf.convert import ARCHITECTURES
    from test_moe import MOE_CONFIGS

    assert set(ARCHITECTURES) <= set(TINY_CONFIGS) | set(MOE_CONFIGS)


def test_unknown_architecture_uses_generic_layout():
    assert layout_for(tiny_model("gpt_neox")) is GENERIC_LAYOUT
    assert layout_for(tiny_model("stablelm")) is GENERIC_LAYOUT
    assert layout_for(tiny_model("qwen3")) is not GENERIC_LAYOUT


def test_linears_reading_one_input_compute_one_mask(monkeypatch):
    model = convert_to_qsparse(tiny_model("mistral"), topk=0.5)
    calls = []
    original = QF.topk_mask
    monkeypatch.setattr(QF, "topk_mask", lambda x, k: calls.append(x.shape[-1]) or original(x, k))
    with torch.no_grad():
        model(_ids())
    # Per layer: q/k/v share one, o one, gate/up share one, the FFN activation one; down_proj's input already has
    # at most K non-zeros, so its top-K is skipped.
    assert len(calls) == 4 * model.config.num_hidden_layers
    # The shared cache holds nothing once the forward pass is over.
    assert all(m.sparsifier._input is None for m in model.modules() if isinstance(m, QSparseLinear))


def test_padding_never_changes_other_tokens():
    model = convert_to_qsparse(tiny_model("llama"), topk=0.5)
    a = _ids(1, 10)
    b = torch.cat([_ids(1, 6), torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4])
    with torch.no_grad():
        batched = model(torch.cat([a, b]), attention_mask=mask).logits
        alone_a = model(a).logits
        alone_b = model(b[:, :6]).logits
    torch.testing.assert_close(batched[0], alone_a[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[1, :6], alone_b[0], rtol=1e-5, atol=1e-5)


def test_sparse_input_has_exactly_k_nonzeros_per_token():
    model = convert_to_qsparse(tiny_model("mistral"), topk=0.3)
    seen = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda mod, args, out: seen.append(mod.sparsifier(args[0]))
    )
    with torch.no_grad():
        model(_ids())
    hook.remove()
    assert ((seen[0] != 0).sum(-1) == QF.keep_count(0.3, 64)).all()


def test_bf16_model_keeps_exact_k():
    model = convert_to_qsparse(tiny_model("qwen3").to(torch.bfloat16), topk=0.7)
    report = qsparse_hf.sparsity_report(model, _ids())
    expected = 1 - QF.keep_count(0.7, 64) / 64
    assert report.per_projection["q"] == pytest.approx(expected, abs=1e-9)


def test_same_config_twice_is_a_no_op_and_a_different_one_raises():
    model = convert_to_qsparse(tiny_model(), topk=0.5)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert convert_to_qsparse(model, topk=0.5) is model
    assert model.model.layers[0].self_attn.q_proj is q_proj
    with pytest.raises(ValueError, match="already converted"):
        convert_to_qsparse(model, topk=0.7)


def test_model_without_linears_is_rejected():
    with pytest.raises(ValueError, match="no nn.Linear"):
        convert_to_qsparse(nn.Sequential(nn.Conv1d(4, 4, 3)), topk=0.5)


def test_unknown_option_and_mixed_arguments_are_rejected():
    with pytest.raises(TypeError, match="unknown option"):
        convert_to_qsparse(tiny_model(), topk=0.5, topk_ratio=0.3)
    with pytest.raises(TypeError, match="either config"):
        convert_to_qsparse(tiny_model(), topk=0.5, config=QSparseConfig())
    with pytest.raises(TypeError, match="nn.Module"):
        convert_to_qsparse("mistral", topk=0.5)


def test_exclude_pattern_that_matches_nothing_warns():
    with pytest.warns(UserWarning, match="matched no"):
        convert_to_qsparse(tiny_model(), topk=0.5, exclude_modules=["lm_head", "not_a_module"])


def test_targets_overrides_and_excludes():
    model = convert_to_qsparse(
        tiny_model(),
        topk=0.5,
        target_modules=[r".*\.mlp\..*"],
        exclude_modules=["lm_head", "layers.1.mlp.up_proj"],
        topk_overrides={"down_proj": 0.25},
    )
    layer0, layer1 = model.model.layers
    assert type(layer0.self_attn.q_proj) is nn.Linear
    assert isinstance(layer0.mlp.up_proj, QSparseLinear) and type(layer1.mlp.up_proj) is nn.Linear
    assert layer0.mlp.down_proj.sparsifier.keep(128) == 32
    assert layer0.mlp.gate_proj.sparsifier.keep(64) == 32


def test_int_topk_larger_than_a_layer_is_rejected():
    with pytest.raises(ValueError, match="exceeds the 64 input features"):
        convert_to_qsparse(tiny_model(), topk=100)


def test_relu2_replaces_the_ffn_activation():
    model = convert_to_qsparse(tiny_model(), topk=0.5, activation="relu2")
    act = model.model.layers[0].mlp.act_fn
    assert isinstance(act, QSparseActivation) and act.relu2
    out = act(torch.randn(4, 128))
    assert (out >= 0).all() and ((out != 0).sum(-1) <= 64).all()
    with pytest.raises(ValueError, match="gated FFN"):
        convert_to_qsparse(tiny_model("gpt_neox"), topk=0.5, activation="relu2")


def test_ffn_topk_one_leaves_the_activation_alone():
    model = convert_to_qsparse(tiny_model(), topk=0.5, ffn_topk=1.0)
    assert not any(isinstance(m, QSparseActivation) for m in model.modules())


def test_revert_and_dequantize_restore_dense_outputs():
    ids = _ids()
    model = tiny_model()
    with torch.no_grad():
        dense = model(ids).logits
        convert_to_qsparse(model, topk=0.5)
        assert model.is_quantized
        model.dequantize()
        assert torch.equal(model(ids).logits, dense)
    assert not qsparse_hf.is_qsparse_model(model)
    assert getattr(model.config, "quantization_config", None) is None


def test_copies_converted_or_reverted_after_generate_static_compile_their_own_call():
    # transformers keeps generate(cache_implementation="static")'s compiled __call__ on the model, and deepcopy
    # carries it over still bound to the original: a copy converted afterwards decoded with the dense original's
    # forward (a benchmark's second keep setting measured the dense model), a reverted copy with the sparse one.
    from transformers import CompileConfig

    compile_config = CompileConfig(backend="eager", mode=None)  # (Dynamo only: fast; any config is kept the same)
    ids = _ids(batch=1)
    dense = tiny_model()
    dense.get_compiled_call(compile_config)  # what generate(static) leaves on the model
    sparse = convert_to_qsparse(copy.deepcopy(dense), topk=0.5)
    twin = copy.deepcopy(sparse)
    twin.get_compiled_call(compile_config)
    reverted = revert_qsparse(copy.deepcopy(twin))
    with torch.no_grad():
        for model in (sparse, twin, reverted):
            assert torch.equal(model.get_compiled_call(compile_config)(ids).logits, model(ids).logits)
        assert not torch.equal(sparse(ids).logits, dense(ids).logits)  # (so the check above could fail)


def test_block_and_quantized_variants_convert():
    model = convert_to_qsparse(tiny_model(), topk=0.5, block_size=16, weight_bits=1.58, activation_bits=8)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert "per 16" in repr(q_proj) and "weight_bits=1.58" in repr(q_proj)
    assert len(torch.unique(q_proj.effective_weight().detach())) == 3
    with torch.no_grad():
        assert torch.isfinite(model(_ids()).logits).all()
    with pytest.raises(ValueError, match="multiple of block_size"):
        convert_to_qsparse(tiny_model(), topk=0.5, block_size=48)


def test_down_proj_topk_skipped_only_when_exact():
    model = tiny_model("mistral")
    convert_to_qsparse(model, topk=0.5)
    downs = [layer.mlp.down_proj for layer in model.model.layers]
    assert all(d.sparsifier.input_within_topk for d in downs)
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        skipped = model(ids).logits
        for d in downs:
            d.sparsifier.input_within_topk = False
        computed = model(ids).logits
    assert torch.equal(skipped, computed)
    # A down_proj keeping fewer entries than the activation lets through must really select.
    other = tiny_model("mistral")
    convert_to_qsparse(other, topk=0.5, ffn_topk=0.9)
    assert not any(layer.mlp.down_proj.sparsifier.input_within_topk for layer in other.model.layers)


def test_nan_propagates_through_a_converted_linear_and_model():
    from torch import nn

    layer = convert_to_qsparse(nn.Sequential(nn.Linear(8, 4)), topk=0.5)[0]
    assert layer(torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, float("nan")]])).isnan().all()
    model = tiny_model("llama")
    with torch.no_grad():
        embeds = model.get_input_embeddings()(torch.randint(3, 128, (1, 6)))
        embeds[0, 2, 5] = float("nan")
        dense = model(inputs_embeds=embeds).logits
        convert_to_qsparse(model, topk=0.5)
        sparse = model(inputs_embeds=embeds).logits
    assert dense.isnan().any() and torch.equal(sparse.isnan(), dense.isnan())  # a diverged run looks diverged


def test_a_tiny_fraction_warns_like_the_refused_count_one():
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match="fewer than 8 input features"):
        convert_to_qsparse(model, topk=0.0001)


def test_a_forward_on_the_meta_device_counts_nothing():
    from qsparse_hf import sparsity_report

    with torch.device("meta"):
        model = tiny_model("llama")
    convert_to_qsparse(model, topk=0.5)
    with torch.no_grad():
        model(torch.randint(3, 128, (1, 4), device="meta"))
    model.to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    report = sparsity_report(model, torch.randint(3, 128, (1, 4)))
    assert report.per_projection["q"] == pytest.approx(0.5)


def test_nn_linear_subclasses_are_converted_and_peft_adapters_skipped():
    peft = pytest.importorskip("peft")

    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    convert_to_qsparse(model, topk=0.5)
    assert isinstance(model[0], QSparseLinear) and isinstance(model[2], QSparseLinear)

    base = tiny_model("llama")
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    convert_to_qsparse(lora.base_model.model, topk=0.5)
    names = [n for n, m in lora.named_modules() if isinstance(m, QSparseLinear)]
    assert any(n.endswith("q_proj.base_layer") for n in names)
    assert not any("lora_" in n for n in names)


@pytest.mark.parametrize("convert_first", [True, False])
def test_adapters_read_the_sparse_input_so_merging_is_exact(convert_first):
    peft = pytest.importorskip("peft")
    from qsparse_hf.stats import collect_counts

    ids = torch.randint(3, 128, (2, 9))
    base = tiny_model("llama")
    if convert_first:
        convert_to_qsparse(base, topk=0.5)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, param in lora.named_parameters():
        if "lora_B" in name:  # as if trained (peft starts B at zero)
            torch.nn.init.normal_(param, std=0.5)
    if convert_first:
        with torch.no_grad():  # dense LoRA branch: merging would change the outputs
            unhooked = lora(ids).logits
        assert qsparse_hf.sparsify_adapter_inputs(lora) == 2 * 3
    else:
        convert_to_qsparse(lora.base_model.model, topk=0.5)  # hooks the adapters itself
    assert qsparse_hf.sparsify_adapter_inputs(lora) == 2 * 3  # idempotent
    qsparse_hf.reset_sparsity(lora)
    with torch.no_grad():
        trained = lora(ids).logits
    counts = collect_counts(lora)
    q_counts = [c.elements for key, c in counts.items() if "q_proj" in key]
    assert q_counts == [2 * 9 * 64] * 2, counts  # counted once per token, not again by the adapter
    merged = lora.merge_and_unload()
    assert qsparse_hf.is_qsparse_model(merged)
    with torch.no_grad():
        after = merged(ids).logits
    torch.testing.assert_close(after, trained, atol=1e-5, rtol=1e-5)
    if convert_first:
        assert (unhooked - trained).abs().max() > 1e-3


def test_right_padding_and_batch_neighbours_do_not_change_a_tokens_output():
    model = convert_to_qsparse(tiny_model("llama"), topk=0.5)
    ids = torch.randint(3, 128, (2, 7))
    with torch.no_grad():
        alone = model(ids[:1]).logits
        batched = model(ids).logits[:1]
        padded = torch.cat([ids[:1], torch.zeros(1, 3, dtype=torch.long)], dim=1)
        mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 3)], dim=1).long()
        right = model(padded, attention_mask=mask).logits[:, :7]
    assert torch.allclose(alone, batched, atol=1e-5) and torch.allclose(alone, right, atol=1e-5)
