"""All-or-nothing saves and resuming from the last complete checkpoint."""

import json

import pytest
import torch
from conftest import tiny_model

from qsparse_hf import convert_to_qsparse
from qsparse_hf.saving import holds_checkpoint, last_complete_checkpoint, save_pretrained_atomic


def _saved_topk(folder):
    return json.loads((folder / "config.json").read_text())["quantization_config"]["topk"]


def test_a_save_killed_half_way_leaves_the_old_checkpoint_loadable(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = convert_to_qsparse(tiny_model("llama"), topk=0.5)
    save_pretrained_atomic(model, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    other = convert_to_qsparse(tiny_model("llama", seed=1), topk=0.7)

    def dies_after_the_config(directory, **kwargs):  # what transformers does: config first, then weights
        other.config.save_pretrained(directory)
        (directory / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(other, "save_pretrained", dies_after_the_config)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained_atomic(other, tmp_path / "ckpt")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the staging folder is gone too
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert reloaded.config.quantization_config.topk == 0.5


def test_resaving_unsharded_removes_a_stale_shard_index(tmp_path):
    model = convert_to_qsparse(tiny_model("llama"), topk=0.5)
    save_pretrained_atomic(model, tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    (tmp_path / "notes.txt").write_text("a user's own file stays")
    save_pretrained_atomic(model, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors.index.json" not in names and "model.safetensors" in names
    assert not any(n.startswith("model-0") for n in names) and "notes.txt" in names
    assert holds_checkpoint(tmp_path) and _saved_topk(tmp_path) == 0.5


def test_resume_skips_a_checkpoint_the_run_did_not_finish(tmp_path, caplog):
    complete = tmp_path / "checkpoint-10"
    complete.mkdir()
    (complete / "trainer_state.json").write_text("{}")
    (complete / "model.safetensors").write_bytes(b"x")
    (tmp_path / "checkpoint-20").mkdir()  # killed while saving
    assert last_complete_checkpoint(tmp_path) == str(complete)
    assert "checkpoint-20" in caplog.text
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_packed_ternary_export_is_all_or_nothing(tmp_path, monkeypatch):
    from qsparse_hf import export

    model = convert_to_qsparse(tiny_model("llama"), topk=0.5, weight_bits=1.58)
    export.save_packed_ternary(model, tmp_path / "packed")
    before = {p.name: p.read_bytes() for p in (tmp_path / "packed").iterdir()}

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export.save_packed_ternary(model, tmp_path / "packed")
    assert {p.name: p.read_bytes() for p in (tmp_path / "packed").iterdir()} == before
    with torch.no_grad():
        assert export.load_packed_ternary(tmp_path / "packed") is not None
