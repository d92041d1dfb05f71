"""Model cards and Hub uploads for Q-Sparse checkpoints.

The card is built with `huggingface_hub`'s card utilities: metadata in the Hub's conventions (``library_name``,
``base_model``, ``datasets``, the ``qsparse`` tag) and a body that states the Q-Sparse settings, the measured sparsity,
how the model was trained and evaluated, and that ``import qsparse_hf`` must precede ``from_pretrained``.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

from huggingface_hub import ModelCard, ModelCardData

from . import __version__
from .config import LOADING_NOTE
from .stats import SparsityReport

__all__ = ["build_model_card", "save_model_card", "push_checkpoint", "push_to_hub_with_card"]

# A Hub repository id ("name" or "owner/name"): what the Hub accepts as base_model metadata.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_LOAD_CALL = re.compile(r'(from_pretrained\()"[^"]*"(\))')
# Where a card written before the repo is known tells readers to load from; push_checkpoint puts the repo id there.
_HERE = "path/to/this/folder"

_OPTIONS = ("topk", "ffn_topk", "activation", "weight_bits", "activation_bits", "block_size", "ste", "rescale",
            "target_modules", "exclude_modules", "topk_overrides")


def _section(title: str, body: str) -> str:
    return f"## {title}\n\n{body.strip()}\n"


def _table(rows: Mapping[str, Any]) -> str:
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows.items()]
    return "\n".join(lines)


def hub_repo_id(name: str | None) -> str | None:
    """``name`` when it is a Hub repository id, None for a local path (which is not valid ``base_model`` metadata).

    Example:
        >>> hub_repo_id("mistralai/Mistral-7B-v0.1"), hub_repo_id("./out/model"), hub_repo_id("/data/m")
        ('mistralai/Mistral-7B-v0.1', None, None)
    """
    if not name or ".." in name or not _REPO_ID.match(name) or Path(name).expanduser().exists():
        return None
    return name


def _base_license(base_model: str | None) -> str | None:
    """The license in the base model's own card: a local folder's README.md, else (when online) its Hub card."""
    if not base_model:
        return None
    try:
        local = Path(base_model).expanduser() / "README.md"
        if local.is_file():
            return ModelCard.load(local).data.license
        from huggingface_hub import constants

        if hub_repo_id(base_model) and not constants.HF_HUB_OFFLINE:
            from huggingface_hub import HfApi

            # One short request (ModelCard.load retries for many seconds when offline).
            card_data = HfApi().model_info(base_model, timeout=5).card_data
            return getattr(card_data, "license", None)
    except Exception:  # no card, no network, a malformed card: the caller falls back to "other"
        return None
    return None


def build_model_card(
    model,
    *,
    base_model: str | None = None,
    report: SparsityReport | None = None,
    datasets: list[str] | None = None,
    training: Mapping[str, Any] | None = None,
    eval_results: Mapping[str, Any] | None = None,
    license: str | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """A model card for a converted (and possibly finetuned) Q-Sparse model.

    Args:
        model: the Q-Sparse model (its ``config.quantization_config`` supplies the settings).
        base_model: hub id or path of the dense model it came from.
        report: measured `SparsityReport` (per-projection sparsity, activated parameters).
        datasets: training datasets (hub ids).
        training: hyper-parameters worth stating (learning rate, batch, steps, ...).
        eval_results: metric -> value.
        license: the card's license; by default the base model's (read from its card), else ``"other"`` with a
            pointer to the base model's terms.
        repo_id: where the model will live on the Hub, for the loading snippet (`push_checkpoint` fills it in).

    Example:
        >>> from transformers import MistralConfig, AutoModelForCausalLM
        >>> from qsparse_hf import convert_to_qsparse
        >>> tiny = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        ...                      num_key_value_heads=1, vocab_size=64)
        >>> model = convert_to_qsparse(AutoModelForCausalLM.from_config(tiny), topk=0.7)
        >>> card = build_model_card(model, base_model="mistralai/Mistral-7B-v0.1", datasets=["Open-Orca/OpenOrca"])
        >>> card.data.tags, card.data.base_model, card.data.license
        (['qsparse', 'sparse', 'activation-sparsity', 'text-generation'], 'mistralai/Mistral-7B-v0.1', 'other')
        >>> "import qsparse_hf" in card.text
        True
    """
    qconfig = getattr(model, "_qsparse_config", None) or getattr(model.config, "quantization_config", None)
    if qconfig is None:
        raise ValueError("this model is not a Q-Sparse model: convert it with convert_to_qsparse first")
    settings = qconfig.to_dict() if hasattr(qconfig, "to_dict") else dict(qconfig)
    base_id = hub_repo_id(base_model)
    license = license or _base_license(base_model)
    data = ModelCardData(
        library_name="transformers",
        base_model=base_id,  # Hub metadata takes repository ids only; a local base is named in the text
        # like base_model: only Hub dataset ids are valid metadata; local files are named in the text
        datasets=[d for d in datasets if hub_repo_id(d)] or None if datasets else None,
        license=license or "other",
        tags=["qsparse", "sparse", "activation-sparsity", "text-generation"],
        pipeline_tag="text-generation",
    )
    name = model_name or (f"{base_model.rstrip('/').split('/')[-1]}-qsparse" if base_model else "Q-Sparse model")
    where = repo_id or _HERE
    body = [f"# {name}\n",
            f"A fully sparsely-activated version of `{base_model or 'a causal LM'}` made with "
            "[qsparse_hf](https://arxiv.org/abs/2407.10969) (Q-Sparse): every linear layer multiplies only the "
            "top-K entries of its input per token.\n",
            _section("How to load", f"""
> {LOADING_NOTE}

Made with qsparse_hf {__version__}. Install that version (or a later one) from the qsparse_hf source tree:
`pip install <path or git URL of qsparse_hf>`, then:

```python
import qsparse_hf  # registers the "qsparse" quantization method
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{where}")
tokenizer = AutoTokenizer.from_pretrained("{where}")
```

Without `import qsparse_hf`, transformers stops with "Unknown quantization type, got qsparse".
"""),
            _section("Q-Sparse configuration", _table({k: settings.get(k) for k in _OPTIONS if k in settings}))]
    if report is not None:
        body.append(_section("Measured sparsity", f"Fraction of zeros in each projection's input, measured on "
                                                  f"{report.tokens} tokens of text:\n\n{report.markdown()}\n\n"
                                                  f"Activated parameters per token: {report.activated_params:,} of "
                                                  f"{report.linear_params:,} linear weights "
                                                  f"({100 * report.activated_fraction:.1f}%)."))
    if datasets or training:
        text = f"Datasets: {', '.join(datasets)}\n\n" if datasets else ""
        if training:
            text += _table(training)
        body.append(_section("Training", text))
    if not license:
        body.append(_section("License", f"Same terms as the base model (`{base_model or 'unknown'}`); set "
                                         "`license` when you build the card to state them here."))
    if eval_results:
        body.append(_section("Evaluation", _table({k: (f"{v:.4g}" if isinstance(v, float) else v)
                                                   for k, v in eval_results.items()})))
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)
    return ModelCard(content)


def save_model_card(output_dir: str | Path, model, **kwargs) -> Path:
    """Write `build_model_card`'s card to ``output_dir/README.md``; returns the path.

    Example:
        >>> import tempfile
        >>> from transformers import MistralConfig, AutoModelForCausalLM
        >>> from qsparse_hf import convert_to_qsparse
        >>> tiny = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        ...                      num_key_value_heads=1, vocab_size=64)
        >>> model = convert_to_qsparse(AutoModelForCausalLM.from_config(tiny), topk=0.5)
        >>> save_model_card(tempfile.mkdtemp(), model).name
        'README.md'
    """
    path = Path(output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    build_model_card(model, **kwargs).save(path)
    return path


def push_checkpoint(output_dir: str | Path, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload Q-Sparse checkpoint") -> str:
    """Create ``repo_id`` if needed and upload a saved checkpoint folder (weights, tokenizer, config, card).

    Refuses a folder that is not a Q-Sparse checkpoint, so a dense model is never pushed under a sparse name.

    Example:
        >>> push_checkpoint("/nonexistent", "me/model")
        Traceback (most recent call last):
        ...
        ValueError: /nonexistent has no config.json with a qsparse quantization_config: save the converted model there first
    """
    from huggingface_hub import HfApi

    folder = Path(output_dir)
    config_path = folder / "config.json"
    qconfig = json.loads(config_path.read_text()).get("quantization_config", {}) if config_path.exists() else {}
    if qconfig.get("quant_method") != "qsparse":
        raise ValueError(f"{folder} has no config.json with a qsparse quantization_config: save the converted "
                         "model there first")
    api = HfApi(token=token)
    repo_id = getattr(api.create_repo(repo_id, private=private, exist_ok=True), "repo_id", repo_id)
    card = folder / "README.md"
    if card.is_file():  # the loading snippet names the repository it is uploaded to
        text = card.read_text()
        section = text.find("## How to load")
        if section >= 0:
            card.write_text(text[:section] + _LOAD_CALL.sub(rf'\1"{repo_id}"\2', text[section:]))
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                             ignore_patterns=["checkpoint-*", "runs/*", "*.pt"])
    return str(getattr(info, "commit_url", info))


def push_to_hub_with_card(model, repo_id: str, *, commit_message: str = "Upload Q-Sparse model",
                          private: bool | None = None, token: str | None = None, base_model: str | None = None,
                          **card_kwargs) -> str:
    """``model.push_to_hub(repo_id)`` for a Q-Sparse model: save it, write the Q-Sparse card (not transformers'
    generic template, which lacks the ``import qsparse_hf`` instruction) and upload the folder.

    `convert_to_qsparse` installs this as the converted model's ``push_to_hub``; ``base_model`` defaults to the
    name the model was loaded from. Extra keyword arguments go to `build_model_card`.

    Example:
        >>> from transformers import MistralConfig, AutoModelForCausalLM
        >>> from qsparse_hf import convert_to_qsparse
        >>> tiny = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        ...                      num_key_value_heads=1, vocab_size=64)
        >>> model = convert_to_qsparse(AutoModelForCausalLM.from_config(tiny), topk=0.5)
        >>> model.push_to_hub.func is push_to_hub_with_card
        True
    """
    base_model = base_model or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        save_model_card(folder, model, base_model=base_model, repo_id=repo_id, **card_kwargs)
        return push_checkpoint(folder, repo_id, private=private, token=token, commit_message=commit_message)
