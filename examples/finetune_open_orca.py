"""Supervised finetuning of a Q-Sparse model on Open-Orca with the HF Trainer (the paper's SFT setting).

    # offline, on the project's fixtures (CPU is fine):
    python examples/finetune_open_orca.py --model_name_or_path ../shared/fixtures/mistral-tiny \\
        --train_file ../shared/fixtures/open-orca-sample/train.jsonl \\
        --validation_file ../shared/fixtures/open-orca-sample/validation.jsonl \\
        --topk 0.7 --output_dir runs/sft-qsparse --num_train_epochs 1 --per_device_train_batch_size 16 \\
        --learning_rate 5e-4 --eval_strategy epoch
    # a real model and the real data:
    python examples/finetune_open_orca.py --model_name_or_path mistralai/Mistral-7B-v0.1 --topk 0.7 \\
        --max_train_samples 200000 --output_dir runs/mistral-qsparse-sft --bf16 --learning_rate 5e-6 \\
        --per_device_train_batch_size 4 --gradient_accumulation_steps 32 --push_to_hub --hub_model_id me/m7b-qsparse

Paper defaults (7B models): global batch 128, learning rate one of {3e-6, 5e-6, 7e-6}, one epoch of Open-Orca.
Small models need a much larger learning rate (1e-4 to 1e-3 for the 10M-parameter fixtures) and a smaller batch;
keep one epoch. ``--dense`` trains the dense baseline with the same script; ``--lora`` trains LoRA adapters (peft)
on top of the frozen sparse model (reading the same top-K inputs) and merges them at the end. The output directory is a complete Q-Sparse checkpoint (weights, tokenizer,
config with the qsparse quantization config, model card) that ``from_pretrained`` reloads after ``import
qsparse_hf``; ``eval_results.json`` / ``all_results.json`` hold the metrics. Runs resume from the last checkpoint
in ``--output_dir``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass, field

import datasets
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)
import qsparse_hf
from qsparse_hf.hub import push_checkpoint, save_model_card
from qsparse_hf.saving import last_complete_checkpoint, save_pretrained_atomic

logger = logging.getLogger(__name__)
COLUMNS = ("system_prompt", "question", "response")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "hub id or local path of the (dense) causal LM"})
    topk: float = field(default=0.7, metadata={"help": "Q-Sparse keep fraction of every projection's input"})
    ffn_topk: float | None = field(default=None, metadata={"help": "keep fraction after the FFN activation"})
    dense: bool = field(default=False, metadata={"help": "train the dense baseline (no conversion)"})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters (peft) instead of all weights"})
    lora_r: int = 16
    lora_alpha: int = 32
    dtype: str = field(default="auto", metadata={"help": "dtype the weights are loaded in (auto, float32, bfloat16)"})


@dataclass
class DataArguments:
    dataset_name: str = field(default="Open-Orca/OpenOrca", metadata={"help": "hub dataset with Open-Orca columns"})
    train_file: str | None = field(default=None, metadata={"help": "local JSON/JSONL (replaces --dataset_name)"})
    validation_file: str | None = field(default=None, metadata={"help": "local JSON/JSONL for evaluation"})
    validation_split_percentage: float = field(default=1.0, metadata={"help": "held out when no validation file"})
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_seq_length: int = field(default=512, metadata={"help": "longer conversations are truncated"})


def _load_split(path: str, split: str) -> datasets.Dataset:
    """One local JSON/JSONL file, checked for rows and the Open-Orca columns, named in every error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--{split}_file {path!r} does not exist")
    with open(path, "rb") as handle:
        if not handle.read(4096).strip():
            raise ValueError(f"--{split}_file {path!r} is empty: it needs rows with the columns {COLUMNS}")
    rows = datasets.load_dataset("json", data_files=path, split="train")
    return _check_columns(rows, f"--{split}_file {path!r}")


def _check_columns(rows: datasets.Dataset, source: str) -> datasets.Dataset:
    if len(rows) == 0:
        raise ValueError(f"{source} has no rows")
    missing = [c for c in COLUMNS if c not in rows.column_names]
    if missing:
        raise ValueError(f"{source} lacks the Open-Orca column(s) {missing}; every row needs {COLUMNS}")
    return rows


def check_rows(rows: datasets.Dataset, source: str) -> None:
    """Every row needs a non-empty question and response (the system prompt may be empty): a missing response
    would train an empty answer, and an evaluation without responses would score end-of-turn tokens only."""
    for column in ("question", "response"):
        for index, value in enumerate(rows[column]):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{source}, row {index}: {column!r} is {'missing' if value is None else repr(value)}; "
                                 f"fill it in or remove the row")


def load_raw_datasets(data: DataArguments, seed: int) -> datasets.DatasetDict:
    """Train/validation splits with the Open-Orca columns, from local files or the hub, checked row by row."""
    if data.train_file:
        raw = datasets.DatasetDict(train=_load_split(data.train_file, "train"))
        if data.validation_file:
            raw["validation"] = _load_split(data.validation_file, "validation")
    else:
        raw = datasets.load_dataset(data.dataset_name)
        _check_columns(raw["train"], f"dataset {data.dataset_name!r}")
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=data.validation_split_percentage / 100, seed=seed)
        raw = datasets.DatasetDict(train=split["train"], validation=split["test"])
    for name, limit in (("train", data.max_train_samples), ("validation", data.max_eval_samples)):
        if limit is not None:
            raw[name] = raw[name].select(range(min(limit, len(raw[name]))))
    sources = {"train": data.train_file or data.dataset_name, "validation": data.validation_file or data.train_file
               or data.dataset_name}
    for name in raw:
        check_rows(raw[name], f"{name} data {sources[name]!r}")
    return raw


def drop_untrainable(tokenized: datasets.DatasetDict, max_seq_length: int) -> datasets.DatasetDict:
    """Drop conversations whose prompt fills ``max_seq_length`` (no response token left to learn), saying how many;
    an error if a split has nothing left."""
    for name in list(tokenized):
        before = len(tokenized[name])
        tokenized[name] = tokenized[name].filter(lambda ex: any(label != -100 for label in ex["labels"]),
                                                 desc=f"dropping over-long prompts ({name})")
        dropped = before - len(tokenized[name])
        if dropped:
            logger.warning("%s: dropped %d of %d conversations whose prompt alone fills --max_seq_length %d",
                           name, dropped, before, max_seq_length)
        if len(tokenized[name]) == 0:
            raise ValueError(f"every {name} conversation's prompt is longer than --max_seq_length {max_seq_length}: "
                             f"nothing is left to train or evaluate on; raise --max_seq_length")
    return tokenized


def format_example(example: dict, tokenizer, max_length: int) -> dict:
    """Tokenize one conversation; labels are -100 except on the response tokens (loss on the answer only).

    Uses the tokenizer's chat template (system / user / assistant); tokenizers without one get a plain
    ``System: … / User: … / Assistant: …`` layout ended by the eos token.
    """
    messages = ([{"role": "system", "content": example["system_prompt"]}] if example["system_prompt"] else []) + [
        {"role": "user", "content": example["question"]}]
    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": example["response"]}],
                                             tokenize=False)
    else:
        prompt = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant: "
        full = prompt + example["response"] + (tokenizer.eos_token or "")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
    labels = [-100] * min(len(prompt_ids), len(ids)) + ids[len(prompt_ids):]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def training_dtype(name: str) -> torch.dtype | str:
    """The dtype to load weights in: ``auto`` keeps the checkpoint's dtype on a GPU, but float32 on a CPU, where
    bf16 matmuls are many times slower (a bf16 checkpoint would otherwise train at a crawl)."""
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return "auto"
    logger.info("no GPU: loading the weights in float32 (pass --dtype bfloat16 to keep the checkpoint's dtype)")
    return torch.float32


def build_model(args: ModelArguments):
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=training_dtype(args.dtype))
    if not args.dense and not qsparse_hf.is_qsparse_model(model):
        options = {"ffn_topk": args.ffn_topk} if args.ffn_topk is not None else {}
        qsparse_hf.convert_to_qsparse(model, topk=args.topk, **options)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        present = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules()} & set(targets))
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=present,
                                                 task_type="CAUSAL_LM"))
        # The LoRA branch reads the same top-K input as the frozen base, so the merged model is the trained one.
        qsparse_hf.sparsify_adapter_inputs(model)
    return model


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])
    if model_args.dense and model_args.lora:
        raise ValueError("--lora trains adapters on the sparse model; drop --dense (or use peft directly)")

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    raw = load_raw_datasets(data_args, training_args.seed)
    with training_args.main_process_first(desc="tokenizing"):
        tokenized = raw.map(format_example, fn_kwargs={"tokenizer": tokenizer, "max_length": data_args.max_seq_length},
                            remove_columns=raw["train"].column_names, desc="tokenizing")
        tokenized = drop_untrainable(tokenized, data_args.max_seq_length)
    model = build_model(model_args)
    callbacks = [] if model_args.dense else [qsparse_hf.QSparseCallback()]
    # Resume where an interrupted run in the same --output_dir stopped (an explicit --resume_from_checkpoint wins).
    last_checkpoint = last_complete_checkpoint(training_args.output_dir)
    if last_checkpoint and not training_args.resume_from_checkpoint:
        logger.info("resuming from %s", last_checkpoint)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"],
        processing_class=tokenizer,
        # Pads to the longest in the batch (labels with -100); --train_sampling_strategy group_by_length (--group_by_length before transformers 5.x) keeps padding low.
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=callbacks,
    )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint or last_checkpoint)
    trainer.save_metrics("train", train_result.metrics)
    metrics = trainer.evaluate()
    metrics["eval_samples"] = len(tokenized["validation"])
    metrics["perplexity"] = math.exp(metrics["eval_loss"]) if metrics["eval_loss"] < 50 else float("inf")
    report = None
    if not model_args.dense:
        # Measured on held-out conversations (the callback's counters were consumed by the logs).
        sample = sum(tokenized["validation"][:32]["input_ids"], [])[: data_args.max_seq_length]
        device = next(trainer.model.parameters()).device
        report = qsparse_hf.sparsity_report(trainer.model, torch.tensor([sample], device=device))
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)  # eval_results.json and all_results.json
    if trainer.is_world_process_zero():
        # LoRA: adapters merged into the sparse model (exact, see build_model), so the output reloads as trained.
        final = trainer.model.merge_and_unload() if model_args.lora else trainer.model
        # Weights + config (+ quantization_config) + tokenizer, all-or-nothing over an earlier save.
        save_pretrained_atomic(final, training_args.output_dir, tokenizer=tokenizer)
        if not model_args.dense:
            hyper = {k: getattr(training_args, k) for k in ("learning_rate", "num_train_epochs",
                                                            "per_device_train_batch_size",
                                                            "gradient_accumulation_steps", "lr_scheduler_type",
                                                            "warmup_steps", "weight_decay", "seed")}
            hyper["max_seq_length"] = data_args.max_seq_length
            hyper["train_samples"] = len(tokenized["train"])
            if model_args.lora:
                hyper.update(lora_r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora="merged")
            save_model_card(training_args.output_dir, final, base_model=model_args.model_name_or_path,
                            report=report, datasets=[data_args.train_file or data_args.dataset_name],
                            training={k: str(v) for k, v in hyper.items()},
                            eval_results={"eval_loss": metrics["eval_loss"], "perplexity": metrics["perplexity"]})
            if training_args.push_to_hub:
                # Our own upload, so the card above is the one that lands (Trainer.push_to_hub writes its own).
                url = push_checkpoint(training_args.output_dir, training_args.hub_model_id
                                      or training_args.output_dir.rstrip("/").split("/")[-1],
                                      token=training_args.hub_token, private=training_args.hub_private_repo)
                logger.info("pushed to %s", url)
    return metrics


if __name__ == "__main__":
    main()
