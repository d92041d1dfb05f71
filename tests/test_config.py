"""QSparseConfig validation and serialisation."""

import math

import pytest

from qsparse_hf import QSparseConfig


@pytest.mark.parametrize(
    "topk, error, message",
    [
        (0.0, ValueError, "outside"),
        (-0.5, ValueError, "outside"),
        (1.5, ValueError, "outside"),
        (math.nan, ValueError, "outside"),
        (True, TypeError, "float in"),
        ("0.7", TypeError, "float in"),
        (None, TypeError, "float in"),
        (1, ValueError, "pass 1.0"),
        (0, ValueError, "positive count"),
        (-3, ValueError, "positive count"),
    ],
)
def test_bad_topk_is_rejected_with_advice(topk, error, message):
    with pytest.raises(error, match=message):
        QSparseConfig(topk=topk)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ffn_topk": 2.0}, "ffn_topk"),
        ({"activation": "gelu"}, "activation"),
        ({"ste": "yes"}, "ste"),
        ({"block_size": 1}, "block_size"),
        ({"block_size": 8, "topk": 16}, "block_size=8"),
        ({"weight_bits": 4}, "weight_bits"),
        ({"activation_bits": 4}, "activation_bits"),
        ({"topk_overrides": {"down_proj": 0}}, "topk_overrides"),
        ({"exclude_modules": ["("]}, "regex"),
        ({"bogus_option": 1}, "unknown QSparseConfig option"),
    ],
)
def test_bad_options_are_rejected(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        QSparseConfig(**kwargs)


def test_round_trip_through_dict():
    cfg = QSparseConfig(topk=0.5, ffn_topk=64, topk_overrides={"down_proj": 0.3}, exclude_modules=["lm_head", "k_proj"])
    again = QSparseConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.to_dict()["quant_method"] == "qsparse"


def test_newer_checkpoint_format_asks_for_upgrade():
    with pytest.raises(ValueError, match="upgrade"):
        QSparseConfig.from_dict({**QSparseConfig().to_dict(), "qsparse_format_version": 99})


def test_matching_is_on_dot_boundaries_or_full_regex():
    cfg = QSparseConfig()
    assert cfg.matches("model.layers.10.mlp.up_proj", ["layers.1"]) is None
    assert cfg.matches("model.layers.1", ["layers.1"]) == "layers.1"
    assert cfg.matches("model.layers.3.self_attn.q_proj", [r"model\.layers\.[0-4]\..*q_proj"]) is not None
    assert cfg.matches("model.layers.3.self_attn.q_proj", ["q"]) is None


def test_effective_ffn_topk_defaults_to_topk():
    assert QSparseConfig(topk=0.6).effective_ffn_topk == 0.6
    assert QSparseConfig(topk=0.6, ffn_topk=1.0).effective_ffn_topk == 1.0
