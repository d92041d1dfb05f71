"""The example scripts run end to end on tiny settings (CPU, seconds)."""

import json

import pytest
from conftest import EMBEDDED_MODEL as EMBEDDED, REPO, fixture_path

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


def _sft_args(out, *extra, steps=30):
    return ["--model_name_or_path", str(fixture_path("mistral-tiny")),
            "--train_file", str(fixture_path("open-orca-sample/train.jsonl")),
            "--validation_file", str(fixture_path("open-orca-sample/validation.jsonl")),
            "--max_train_samples", "480", "--max_eval_samples", "48", "--max_seq_length", "128",
            "--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size", "16",
            "--learning_rate", "1e-3", "--report_to", "none", "--dtype", "float32", "--save_strategy", "no",
            "--seed", "0", *extra]


def test_finetune_open_orca_lowers_eval_loss_and_keeps_sparsity(tmp_path):
    import torch
    from examples.finetune_open_orca import format_example, main
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fixture_path("mistral-tiny"))
    rows = [json.loads(line) for line in fixture_path("open-orca-sample/validation.jsonl").read_text().splitlines()]
    model = qsparse_hf.convert_to_qsparse(AutoModelForCausalLM.from_pretrained(fixture_path("mistral-tiny"),
                                                                               dtype=torch.float32), topk=0.7)
    with torch.no_grad():
        losses = []
        for row in rows[:48]:
            ex = format_example(row, tokenizer, 128)
            losses.append(model(torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss.item())
    before = sum(losses) / len(losses)

    out = tmp_path / "sft"
    metrics = main(_sft_args(out, "--topk", "0.7"))
    assert metrics["eval_loss"] < before - 0.3, (before, metrics["eval_loss"])
    results = json.loads((out / "eval_results.json").read_text())
    assert json.loads((out / "all_results.json").read_text())["eval_loss"] == results["eval_loss"]
    # K = floor(0.7 * 256) of 256 features: 30.1% zeros in every projection input, also after training.
    assert results["eval_sparsity/o_proj"] == pytest.approx(1 - 179 / 256, abs=0.01)  # the evaluation's own count
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert qsparse_hf.is_qsparse_model(reloaded)
    card = (out / "README.md").read_text()
    assert "Measured sparsity" in card and "eval_loss" in card and "qsparse" in card
    # A local base model and data file are named in the text, not written as (invalid) Hub metadata.
    metadata = card.split("---")[1]
    assert "base_model" not in metadata and "/work" not in metadata and "train.jsonl" in card


def test_finetune_labels_cover_only_the_response():
    from examples.finetune_open_orca import format_example
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fixture_path("mistral-tiny"))
    row = {"system_prompt": "Be brief.", "question": "Define cat.", "response": "A small feline."}
    ex = format_example(row, tokenizer, 256)
    answer = tokenizer.decode([t for t, label in zip(ex["input_ids"], ex["labels"]) if label != -100])
    assert "A small feline." in answer and "Define cat." not in answer


def test_finetune_push_to_hub_uploads_the_checkpoint_folder(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from examples.finetune_open_orca import main

    uploads = {}
    from types import SimpleNamespace

    monkeypatch.setattr(HfApi, "create_repo",
                        lambda self, repo_id, **kw: SimpleNamespace(repo_id=uploads.setdefault("repo", repo_id)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: uploads.update(kw) or "https://hub/commit")
    out = tmp_path / "sft"
    main(_sft_args(out, "--topk", "0.5", "--push_to_hub", "--hub_model_id", "me/tiny-qsparse", steps=2))
    assert uploads["repo"] == "me/tiny-qsparse" and uploads["folder_path"] == str(out)
    files = {p.name for p in out.iterdir()}
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "qsparse"


def test_finetune_resumes_from_the_last_checkpoint(tmp_path, monkeypatch):
    from transformers import Trainer

    from examples.finetune_open_orca import main

    out = tmp_path / "sft"
    args = _sft_args(out, "--topk", "0.7", steps=2)
    args[args.index("--save_strategy") + 1] = "steps"
    main([*args, "--save_steps", "2"])
    seen = {}
    original = Trainer.train

    def recording_train(self, resume_from_checkpoint=None, **kwargs):
        seen["resume"] = resume_from_checkpoint
        return original(self, resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    monkeypatch.setattr(Trainer, "train", recording_train)
    args[args.index("--max_steps") + 1] = "3"
    main([*args, "--save_steps", "2"])
    assert seen["resume"] == str(out / "checkpoint-2")


def test_finetune_lora_saves_the_merged_sparse_model_it_trained(tmp_path, monkeypatch):
    import torch
    from examples import finetune_open_orca

    saved = {}
    original_save = finetune_open_orca.save_pretrained_atomic

    def capture(model, directory, **kwargs):
        saved["model"] = model
        return original_save(model, directory, **kwargs)

    monkeypatch.setattr(finetune_open_orca, "save_pretrained_atomic", capture)
    out = tmp_path / "lora"
    metrics = finetune_open_orca.main(_sft_args(out, "--topk", "0.7", "--lora", "True", "--lora_r", "4", steps=3))
    assert metrics["eval_loss"] > 0 and not (out / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert qsparse_hf.is_qsparse_model(reloaded) and not any("lora" in n for n, _ in reloaded.named_modules())
    base = AutoModelForCausalLM.from_pretrained(fixture_path("mistral-tiny"), dtype=torch.float32)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(reloaded.state_dict()[name], base.state_dict()[name])  # the adapter was merged in
    ids = torch.randint(3, 200, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, saved["model"].eval()(ids).logits)
    assert "lora" in (out / "README.md").read_text()


def test_continue_pretraining_packs_text_and_saves(tmp_path):
    from examples.continue_pretraining import main

    out = tmp_path / "cpt"
    metrics = main(["--model_name_or_path", str(EMBEDDED), "--train_file", TEXT, "--output_dir", str(out),
                    "--max_steps", "3", "--per_device_train_batch_size", "2", "--block_size", "128",
                    "--max_eval_blocks", "4", "--report_to", "none", "--dtype", "float32", "--learning_rate", "5e-5",
                    "--weight_decay", "0.01"])
    assert metrics["perplexity"] > 1
    assert qsparse_hf.is_qsparse_model(AutoModelForCausalLM.from_pretrained(out))


def _orca_rows(n=6):
    return [{"id": str(i), "system_prompt": "", "question": f"What is {i} plus {i}?", "response": f"{2 * i}."}
            for i in range(n)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run_sft(tmp_path, train, validation, *extra):
    from examples.finetune_open_orca import main

    return main(["--model_name_or_path", str(EMBEDDED), "--train_file", str(train), "--validation_file",
                 str(validation), "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--report_to", "none",
                 "--save_strategy", "no", "--per_device_train_batch_size", "2", *extra])


def _bad_training_data(tmp_path):
    good = _write_jsonl(tmp_path / "good.jsonl", _orca_rows())
    null_response = _orca_rows()
    null_response[3]["response"] = None
    no_response = [{k: v for k, v in r.items() if k != "response"} for r in _orca_rows()]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    return [
        ("null response", _write_jsonl(tmp_path / "null.jsonl", null_response), good, [], r"row 3: 'response' is missing"),
        ("validation without responses", good, _write_jsonl(tmp_path / "nores.jsonl", no_response), [],
         r"validation_file .*nores.jsonl.* lacks the Open-Orca column\(s\) \['response'\]"),
        ("train without responses", _write_jsonl(tmp_path / "nores2.jsonl", no_response), good, [],
         r"train_file .*nores2.jsonl.* lacks"),
        ("empty train file", empty, good, [], r"train_file .*empty.jsonl.* is empty"),
        ("every prompt too long", good, good, ["--max_seq_length", "4"], r"longer than --max_seq_length 4"),
    ]


def test_finetune_refuses_bad_training_data_naming_file_and_row(tmp_path):
    failures = []
    for name, train, validation, extra, message in _bad_training_data(tmp_path):
        try:
            _run_sft(tmp_path, train, validation, *extra)
        except ValueError as err:
            import re

            if not re.search(message, str(err)):
                failures.append(f"{name}: {err}")
        else:
            failures.append(f"{name}: trained without a word")
    assert not failures, failures
    assert not (tmp_path / "out" / "config.json").exists()


def test_finetune_drops_over_long_prompts_and_says_how_many(tmp_path, caplog):
    rows = _orca_rows()
    rows[1]["question"] = "a very long question " * 200
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    _run_sft(tmp_path, train, _write_jsonl(tmp_path / "val.jsonl", _orca_rows()), "--max_seq_length", "64")
    assert "dropped 1 of 6 conversations" in caplog.text


def test_auto_dtype_trains_in_float32_on_a_cpu(monkeypatch):
    import torch
    from examples.finetune_open_orca import training_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_dtype("auto") is torch.float32
    assert training_dtype("bfloat16") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training_dtype("auto") == "auto"
