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


class _FakeHub:
    """Stands in for huggingface_hub.HfApi: records what would be uploaded."""

    uploads: list = []

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, private=None, exist_ok=False):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, commit_message, ignore_patterns):
        from pathlib import Path

        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir() if p.is_file()}
        _FakeHub.uploads.append((repo_id, files))
        return type("CommitInfo", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()


def test_card_from_a_local_base_has_valid_metadata_and_inherits_its_license(tmp_path):
    model = convert_to_qsparse(tiny_model("mistral"), topk=0.5)
    card = build_model_card(model, base_model=str(tmp_path))  # a local folder without a card
    assert card.data.base_model is None and card.data.license == "other"
    assert str(tmp_path) in card.text and "## License" in card.text and "<this repo>" not in card.text
    assert "pip install qsparse_hf" not in card.text
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# base\n")
    card = build_model_card(model, base_model=str(tmp_path))
    assert card.data.license == "apache-2.0" and "## License" not in card.text
    hub_card = build_model_card(model, base_model="org/base", license="mit", repo_id="me/base-qsparse")
    assert hub_card.data.base_model == "org/base" and hub_card.data.license == "mit"
    assert 'from_pretrained("me/base-qsparse")' in hub_card.text


def test_model_push_to_hub_uploads_the_qsparse_card_naming_the_repo(monkeypatch):
    import huggingface_hub
    from qsparse_hf import revert_qsparse

    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeHub)
    _FakeHub.uploads.clear()
    model = convert_to_qsparse(tiny_model("mistral"), topk=0.5)
    assert model.push_to_hub("me/tiny-qsparse").endswith("/commit/1")
    [(repo_id, files)] = _FakeHub.uploads
    card = files["README.md"].decode()
    assert repo_id == "me/tiny-qsparse" and 'from_pretrained("me/tiny-qsparse")' in card
    assert "import qsparse_hf" in card and "path/to/this/folder" not in card
    assert json.loads(files["config.json"])["quantization_config"]["quant_method"] == "qsparse"
    revert_qsparse(model)
    assert "push_to_hub" not in model.__dict__  # a dense model goes back to transformers' own upload


def test_a_whole_converted_model_survives_torch_save_and_load(tmp_path, monkeypatch):
    # torch.save(model) pickles the model object, with the card upload installed on it; loading it back must give
    # the same model, still uploading the Q-Sparse card.
    import huggingface_hub
    import torch

    model = convert_to_qsparse(tiny_model("mistral"), topk=0.5)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    ids = torch.randint(3, 128, (1, 6))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeHub)
    _FakeHub.uploads.clear()
    loaded.push_to_hub("me/tiny-qsparse")
    [(_, files)] = _FakeHub.uploads
    assert "import qsparse_hf" in files["README.md"].decode()


def test_push_checkpoint_puts_the_repo_id_into_a_saved_card(tmp_path, monkeypatch):
    import huggingface_hub
    from qsparse_hf.hub import save_model_card

    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeHub)
    _FakeHub.uploads.clear()
    model = convert_to_qsparse(tiny_model("mistral"), topk=0.5)
    model.save_pretrained(tmp_path)
    save_model_card(tmp_path, model, base_model="org/base")
    push_checkpoint(tmp_path, "me/saved")
    card = _FakeHub.uploads[0][1]["README.md"].decode()
    assert card.count('from_pretrained("me/saved")') == 2 and "path/to/this/folder" not in card
