"""Quality checks on the pretrained fixture models: a random model would hide these (skipped without fixtures)."""

import pytest
import torch
from conftest import fixture_path
from transformers import AutoModelForCausalLM, AutoTokenizer

from qsparse_hf import convert_to_qsparse, revert_qsparse, sparsity_report
from qsparse_hf import functional as QF
from qsparse_hf.evaluation import perplexity


@pytest.fixture(scope="module", params=["mistral-tiny", "qwen3-tiny"])
def pretrained(request):
    path = fixture_path(request.param)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tokenizer


def test_perplexity_degrades_gracefully_with_topk(pretrained, heldout_text):
    model, tokenizer = pretrained
    text = heldout_text[:8000]
    dense = perplexity(model, tokenizer, text)
    results = {}
    for topk in (1.0, 0.7, 0.3):
        convert_to_qsparse(model, topk=topk)
        results[topk] = perplexity(model, tokenizer, text)
        revert_qsparse(model)
    assert results[1.0] == dense
    # Without any training, keeping 70% costs little on a trained model, keeping 30% costs a lot.
    assert dense < results[0.7] < 1.15 * dense
    assert results[0.3] > 1.3 * results[0.7]


def test_report_on_real_text_is_exact_in_bf16(pretrained, heldout_text):
    model, tokenizer = pretrained
    bf16 = AutoModelForCausalLM.from_pretrained(model.name_or_path, dtype=torch.bfloat16).eval()
    convert_to_qsparse(bf16, topk=0.7)
    ids = tokenizer(heldout_text[:3000], return_tensors="pt").input_ids[:, :256]
    report = sparsity_report(bf16, ids)
    hidden = bf16.config.hidden_size
    assert report.per_projection["q"] == pytest.approx(1 - QF.keep_count(0.7, hidden) / hidden, abs=1e-12)
    assert report.per_projection["act"] == pytest.approx(
        1 - QF.keep_count(0.7, bf16.config.intermediate_size) / bf16.config.intermediate_size, abs=1e-12)
    assert 0.2 < report.overall < 0.4 and 0.6 < report.activated_fraction < 0.85
