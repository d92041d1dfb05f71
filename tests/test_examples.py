"""The example scripts run end to end on tiny settings (CPU, seconds)."""

import json

import pytest
from conftest import REPO

import qsparse_hf
from transformers import AutoModelForCausalLM

TEXT = str(REPO / "examples" / "data" / "sample_text.txt")


@pytest.mark.parametrize("variant", ["dense", "qsparse", "qsparse-1.58"])
def test_pretrain_from_scratch_runs_and_saves(variant, tmp_path):
    from examples.pretrain_from_scratch import main

    out = tmp_path / variant
    main(["--variant", variant, "--train_file", TEXT, "--validation_file", TEXT, "--output_dir", str(out),
          "--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2", "--num_key_value_heads",
          "1", "--intermediate_size", "64", "--block_size", "32", "--max_steps", "3", "--logging_steps", "1",
          "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no", "--use_cpu"])
    record = json.loads((out / "log_history.json").read_text())
    assert record["variant"] == variant and sum("loss" in e for e in record["log_history"]) == 3
    assert (out / "eval_results.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert qsparse_hf.is_qsparse_model(model) == (variant != "dense")
    if variant != "dense":
        assert model.model.layers[0].mlp.act_fn.relu2
        assert "sparsity/overall" in record["log_history"][0]


def test_quickstart_runs_on_the_embedded_model(capsys):
    from examples.quickstart import main

    main(["--model", str(REPO / "examples" / "models" / "mistral-micro"), "--text-file", TEXT, "--max-chars", "3000"])
    out = capsys.readouterr().out
    assert "logits bit-identical: True" in out and "perplexity dense" in out
