"""Model cards, Hub upload guard and the offline lm-eval task builder."""

import json

import pytest
from conftest import tiny_model

from qsparse_hf import convert_to_qsparse
from qsparse_hf.hub import build_model_card, push_checkpoint
from qsparse_hf.tasks import build_definitions_task


def test_card_states_config_sparsity_training_and_eval():
    from qsparse_hf import sparsity_report
    import torch

    model = convert_to_qsparse(tiny_model("mistral"), topk=0.5)
    report = sparsity_report(model, torch.randint(3, 128, (1, 16)))
    card = build_model_card(model, base_model="org/base", report=report, datasets=["Open-Orca/OpenOrca"],
                            training={"learning_rate": "5e-6"}, eval_results={"eval_loss": 1.2345678})
    assert card.data.datasets == ["Open-Orca/OpenOrca"] and card.data.library_name == "transformers"
    assert "| topk | 0.5 |" in card.text and "50.0%" in card.text and "| learning_rate | 5e-6 |" in card.text
    assert "| eval_loss | 1.235 |" in card.text


def test_card_and_push_refuse_a_dense_model(tmp_path):
    with pytest.raises(ValueError, match="convert it with convert_to_qsparse"):
        build_model_card(tiny_model("mistral"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ValueError, match="no config.json with a qsparse quantization_config"):
        push_checkpoint(tmp_path, "me/model")


def test_task_builder_needs_four_rows_and_keeps_the_answer(tmp_path):
    src = tmp_path / "v.jsonl"
    src.write_text("\n".join(json.dumps({"question": f"q{i}", "response": f"r{i}"}) for i in range(3)))
    with pytest.raises(ValueError, match="four are needed"):
        build_definitions_task(src, tmp_path / "t.jsonl")
    src.write_text("\n".join(json.dumps({"question": f"q{i}", "response": f"r{i}"}) for i in range(10)))
    assert build_definitions_task(src, tmp_path / "t.jsonl", rows=10) == 10
    items = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert all(item["choices"][item["label"]] == f"r{i}" and len(set(item["choices"])) == 4
               for i, item in enumerate(items))
