"""Sparsity measurement, sparsity_report and QSparseCallback (log_history, TensorBoard, heatmap)."""

import glob

import pytest
import torch
from conftest import tiny_model
from transformers import Trainer, TrainingArguments

import qsparse_hf
from qsparse_hf import QSparseCallback, convert_to_qsparse, sparsity_report
from qsparse_hf import functional as QF
from qsparse_hf.stats import collect_counts


def _data(n=16, seq=16):
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 128, (n, seq))]


def test_report_matches_the_configured_keep_ratio():
    model = convert_to_qsparse(tiny_model("mistral"), topk=0.5, ffn_topk=0.25)
    report = sparsity_report(model, torch.randint(3, 128, (2, 10)))
    assert report.tokens == 20
    for role in ("q", "k", "v", "o", "gate", "up"):
        assert report.per_projection[role] == pytest.approx(1 - QF.keep_count(0.5, 64) / 64)
    assert report.per_projection["act"] == pytest.approx(0.75)
    # down's input is act * up, so at least as sparse as the activation output.
    assert report.per_projection["down"] >= 0.75
    assert set(report.per_layer) == {0, 1}
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert report.linear_params == linear
    converted = [m for m in model.modules() if isinstance(m, qsparse_hf.QSparseLinear)]
    expected_active = model.lm_head.weight.numel() + sum(
        m.weight.numel() * (1 - report.per_layer[m.layer_index][m.role]) for m in converted
    )
    assert report.activated_params == pytest.approx(expected_active, abs=1)
    assert "down" in str(report) and "activated" in str(report)


def test_report_without_tokens_explains_what_to_do():
    model = convert_to_qsparse(tiny_model(), topk=0.5)
    with pytest.raises(ValueError, match="no tokens"):
        sparsity_report(model)


def test_tracking_can_be_switched_off():
    model = convert_to_qsparse(tiny_model(), topk=0.5, track_sparsity=False)
    with torch.no_grad():
        model(torch.randint(3, 128, (1, 8)))
    assert all(c.elements == 0 for c in collect_counts(model).values())
    qsparse_hf.set_sparsity_tracking(model, True)
    assert sparsity_report(model, torch.randint(3, 128, (1, 8))).tokens == 8


def test_gradient_checkpointing_does_not_double_count():
    ids = torch.randint(3, 128, (2, 12))
    counts = []
    for checkpointing in (False, True):
        model = convert_to_qsparse(tiny_model(), topk=0.5).train()
        if checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable()
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
        model(ids, labels=ids).loss.backward()
        counts.append({k: (c.zeros, c.elements) for k, c in collect_counts(model).items()})
    assert counts[0] == counts[1]


def test_callback_logs_reach_log_history_tensorboard_and_heatmap(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = convert_to_qsparse(tiny_model("qwen3"), topk=0.6).train()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, logging_steps=2,
                             report_to=["tensorboard"], save_strategy="no",
                             use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=_data(), callbacks=[QSparseCallback(per_layer=True)])
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    expected = 1 - QF.keep_count(0.6, 64) / 64
    for entry in logged:
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            assert entry[f"sparsity/{proj}"] == pytest.approx(expected if proj != "down_proj" else entry[f"sparsity/{proj}"])
        assert entry["sparsity/q_proj"] == pytest.approx(expected)
        assert 0 < entry["sparsity/overall"] < 1
        assert entry["activated_params"] > 0
        assert "sparsity/layer_1/down_proj" in entry
    events = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    assert events
    tags = set()
    for event_file in events:
        accumulator = EventAccumulator(event_file)
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train/sparsity/q_proj", "train/sparsity/overall", "train/activated_params"} <= tags
    assert (tmp_path / "qsparse_sparsity.png").stat().st_size > 1000


def test_callback_refuses_a_dense_model(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=_data(4), callbacks=[QSparseCallback()])
    with pytest.raises(ValueError, match="import qsparse_hf"):
        trainer.train()


def test_evaluation_sparsity_is_logged_apart_under_eval_keys(tmp_path):
    # Eval logs carry eval_ keys only, train logs training numbers only, and the training totals count no eval token.
    model = convert_to_qsparse(tiny_model("llama"), topk=0.5).train()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, logging_steps=2,
                             eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True)
    callback = QSparseCallback()
    trainer = Trainer(model=model, args=args, train_dataset=_data(), eval_dataset=_data(4), callbacks=[callback])
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    trains = [e for e in trainer.state.log_history if "loss" in e]
    assert len(evals) == 2 and len(trains) == 2
    for entry in evals:
        assert entry["eval_sparsity/q_proj"] == pytest.approx(0.5)
        assert not any(k.startswith("sparsity/") for k in entry)
    for entry in trains:
        assert entry["sparsity/q_proj"] == pytest.approx(0.5)
        assert not any(k.startswith("eval_sparsity") for k in entry)
    # The training totals (heatmap) hold training tokens only: 4 steps x 4 rows x 16 tokens.
    q = next(c for name, c in callback._totals.items() if name.endswith("layers.0.self_attn.q_proj"))
    assert q.elements == 4 * 4 * 16 * 64


def test_counts_are_summed_over_processes(monkeypatch):
    import torch.distributed as dist

    model = convert_to_qsparse(tiny_model("llama"), topk=0.5)
    with torch.no_grad():
        model(torch.randint(3, 128, (1, 8)))
    local = collect_counts(model)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor: tensor.mul_(2))  # a second rank with the same counts
    summed = collect_counts(model, across_processes=True)
    for name, count in local.items():
        assert (summed[name].zeros, summed[name].elements) == (2 * count.zeros, 2 * count.elements)


def _padded_and_unpadded_reports(model, tokenizer, texts, padding_side):
    from qsparse_hf.stats import reset_sparsity

    reset_sparsity(model)
    with torch.no_grad():
        for text in texts:
            model(**tokenizer(text, return_tensors="pt"))
    unpadded = sparsity_report(model)
    tokenizer.padding_side = padding_side
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at 0
    padded = sparsity_report(model, {**batch, "position_ids": positions})
    return unpadded, padded, int((batch.attention_mask == 0).sum())


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padding_tokens_do_not_count_as_sparsity(padding_side):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import fixture_path

    path = fixture_path("mistral-tiny")  # its padding token embeds to a zero vector, as with padding_idx
    model = convert_to_qsparse(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), topk=0.7).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = ["A short line.", "A much longer line of English text, so that the first one needs plenty of padding "
             "tokens to fill the batch up to the length of this one."]
    unpadded, padded, pads = _padded_and_unpadded_reports(model, tokenizer, texts, padding_side)
    assert pads >= 15 and padded.tokens == unpadded.tokens
    for role, value in unpadded.per_projection.items():
        assert padded.per_projection[role] == pytest.approx(value, abs=0.005), role
    assert padded.overall == pytest.approx(unpadded.overall, abs=0.005)
    # Counting every row (as before padding was known) would report the zero padding vectors as sparsity.
    qsparse_hf.layers.RealTokenTracker.detach(model)
    _, counted_all, _ = _padded_and_unpadded_reports(model, tokenizer, texts, padding_side)
    assert counted_all.per_projection["q"] > unpadded.per_projection["q"] + 0.02


def test_real_token_tracking_survives_deepcopy_and_revert():
    import copy

    model = convert_to_qsparse(tiny_model(), topk=0.5)
    assert model._forward_pre_hooks
    twin = copy.deepcopy(model)
    ids = torch.randint(3, 128, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    assert sparsity_report(twin, {"input_ids": ids, "attention_mask": mask}).tokens == 10
    qsparse_hf.revert_qsparse(model)
    assert not model._forward_pre_hooks and not model._forward_hooks
