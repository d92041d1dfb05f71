"""Train a Llama-style causal LM from scratch: dense, Q-Sparse (squared-ReLU FFN + top-K) or quantized Q-Sparse.

The paper's from-scratch recipe: Q-Sparse at top-K 70 % with squared ReLU in the gated FFN, optionally with BitNet
b1.58 (ternary weights, 8-bit activations). Sizes are flags; data is local text files, a hub dataset (streaming),
or pre-tokenized ``.npy`` token arrays (e.g. ``tokens_train.npy`` from ``../shared/fixtures/make_corpus.py``).

    python examples/pretrain_from_scratch.py --variant qsparse --train_file corpus.txt --output_dir runs/qsparse \\
        --max_steps 200 --per_device_train_batch_size 16
    python examples/pretrain_from_scratch.py --variant dense --dataset_name HuggingFaceFW/fineweb-edu ...

Each run writes ``log_history.json`` in ``--output_dir``; ``examples/plot_loss_curves.py`` draws several runs.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import qsparse_hf

HERE = Path(__file__).resolve().parent
VARIANTS = ("dense", "qsparse", "qsparse-1.58")


@dataclass
class ModelArguments:
    variant: str = field(default="qsparse", metadata={"help": f"one of {VARIANTS}"})
    topk: float = field(default=0.7, metadata={"help": "Q-Sparse keep fraction per projection input"})
    tokenizer_name: str = field(default=str(HERE / "models" / "mistral-micro"),
                                metadata={"help": "hub id or path of the tokenizer (its vocabulary sizes the model)"})
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    intermediate_size: int = 768

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"--variant must be one of {VARIANTS}, got {self.variant!r}")


@dataclass
class DataArguments:
    train_file: list[str] | None = field(default=None, metadata={"help": "text files, or .npy token arrays"})
    validation_file: list[str] | None = field(default=None, metadata={"help": "text files, or .npy token arrays"})
    dataset_name: str | None = field(default=None, metadata={"help": "hub dataset with a 'text' column (streamed)"})
    max_train_tokens: int = field(default=50_000_000, metadata={"help": "tokens taken from a streamed dataset"})
    block_size: int = 512
    max_eval_blocks: int = 64


def _tokens(files: list[str], tokenizer) -> np.ndarray:
    arrays = []
    for path in files:
        if path.endswith(".npy"):
            arrays.append(np.load(path).astype(np.int64))
        else:
            from datasets import load_dataset

            text = load_dataset("text", data_files=path, sample_by="document")["train"]["text"]
            arrays.extend(np.array(tokenizer(t, verbose=False).input_ids + [tokenizer.eos_token_id]) for t in text)
    return np.concatenate(arrays)


def _streamed_tokens(name: str, tokenizer, limit: int) -> np.ndarray:
    from datasets import load_dataset

    chunks, total = [], 0
    for row in load_dataset(name, split="train", streaming=True):
        ids = tokenizer(row["text"], verbose=False).input_ids + [tokenizer.eos_token_id]
        chunks.append(np.array(ids))
        total += len(ids)
        if total >= limit:
            break
    return np.concatenate(chunks)


class BlockDataset(torch.utils.data.Dataset):
    """Consecutive fixed-length blocks of a token stream (labels = inputs; the model shifts them)."""

    def __init__(self, tokens: np.ndarray, block_size: int, max_blocks: int | None = None):
        count = len(tokens) // block_size
        if count == 0:
            raise ValueError(f"only {len(tokens)} tokens: not one block of {block_size}")
        self.blocks = torch.from_numpy(tokens[: count * block_size].reshape(count, block_size)[:max_blocks].copy())

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def build_model(args: ModelArguments, vocab_size: int) -> torch.nn.Module:
    """A Llama-style model of the requested size, converted for the requested variant."""
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                         num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
                         num_key_value_heads=args.num_key_value_heads, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    if args.variant != "dense":
        quant = {"weight_bits": 1.58, "activation_bits": 8} if args.variant == "qsparse-1.58" else {}
        qsparse_hf.convert_to_qsparse(model, topk=args.topk, activation="relu2", **quant)
    return model


def main(argv=None) -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    if not data_args.train_file and not data_args.dataset_name:
        parser.error("give --train_file (text or .npy) or --dataset_name")
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name)
    if data_args.train_file:
        train_tokens = _tokens(data_args.train_file, tokenizer)
    else:
        train_tokens = _streamed_tokens(data_args.dataset_name, tokenizer, data_args.max_train_tokens)
    eval_dataset = None
    if data_args.validation_file:
        eval_dataset = BlockDataset(_tokens(data_args.validation_file, tokenizer), data_args.block_size,
                                    data_args.max_eval_blocks)
    train_dataset = BlockDataset(train_tokens, data_args.block_size)

    torch.manual_seed(training_args.seed)
    model = build_model(model_args, len(tokenizer))
    params = sum(p.numel() for p in model.parameters())
    print(f"{model_args.variant}: {params / 1e6:.2f}M parameters, {len(train_dataset)} training blocks")
    callbacks = [qsparse_hf.QSparseCallback()] if model_args.variant != "dense" else []
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      callbacks=callbacks)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate() if eval_dataset is not None else {}
    if metrics:
        metrics["eval_perplexity"] = math.exp(metrics["eval_loss"])
        trainer.save_metrics("eval", metrics)
    trainer.save_model()
    tokenizer.save_pretrained(training_args.output_dir)
    os.makedirs(training_args.output_dir, exist_ok=True)
    with open(os.path.join(training_args.output_dir, "log_history.json"), "w") as f:
        json.dump({"variant": model_args.variant, "params": params, "log_history": trainer.state.log_history}, f)
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
