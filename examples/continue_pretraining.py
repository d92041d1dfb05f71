"""Continue pretraining a converted model (the paper's continue-training setting) with the HF Trainer.

Causal-LM training on ``HuggingFaceFW/fineweb-edu`` (streamed) by default, or on local text / JSONL files, packed into
fixed blocks of ``--block_size`` tokens. The paper's recipe: Adam, learning rate 5e-5 decaying to 1e-6 (use
``--lr_scheduler_type cosine_with_min_lr --lr_scheduler_kwargs '{"min_lr": 1e-6}'``), weight decay 0.01.

    python examples/continue_pretraining.py --model_name_or_path ../shared/fixtures/mistral-tiny \\
        --train_file ../shared/fixtures/heldout_text.txt --topk 0.7 --output_dir runs/cpt --max_steps 50 \\
        --per_device_train_batch_size 8 --learning_rate 5e-5 --weight_decay 0.01
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/continue_pretraining.py \\
        --model_name_or_path mistralai/Mistral-7B-v0.1 --max_steps 10000 --bf16 --output_dir runs/m7b-cpt ...
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import datasets
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments
from transformers import default_data_collator

import qsparse_hf
from qsparse_hf.saving import last_complete_checkpoint, save_pretrained_atomic

try:  # run as a module (examples.continue_pretraining) or as a script
    from .finetune_open_orca import training_dtype
except ImportError:
    from finetune_open_orca import training_dtype
from qsparse_hf.hub import save_model_card


@dataclass
class Arguments:
    model_name_or_path: str = field(metadata={"help": "hub id or local path of the causal LM"})
    topk: float = field(default=0.7, metadata={"help": "Q-Sparse keep fraction"})
    dense: bool = field(default=False, metadata={"help": "continue training the dense baseline instead"})
    dataset_name: str = field(default="HuggingFaceFW/fineweb-edu", metadata={"help": "hub dataset, streamed"})
    dataset_config: str | None = field(default="sample-10BT", metadata={"help": "hub dataset configuration"})
    train_file: list[str] | None = field(default=None, metadata={"help": "local .txt or .jsonl ('text') files"})
    validation_file: list[str] | None = None
    block_size: int = 512
    max_eval_blocks: int = 64
    dtype: str = "auto"


def packed_blocks(texts, tokenizer, block_size: int):
    """Concatenate tokenized texts (eos between documents) and cut them into ``block_size`` blocks."""
    buffer: list[int] = []
    for text in texts:
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        while len(buffer) >= block_size:
            block, buffer = buffer[:block_size], buffer[block_size:]
            yield {"input_ids": block, "attention_mask": [1] * block_size, "labels": list(block)}


def _texts(files: list[str] | None, args: Arguments, split: str):
    if files:
        kind = "json" if all(f.endswith((".json", ".jsonl")) for f in files) else "text"
        if kind == "text":
            # Whole files, split into paragraphs, so short lines do not become separate documents.
            for name in files:
                with open(name) as handle:
                    yield from (p for p in handle.read().split("\n\n") if p.strip())
            return
        yield from (row["text"] for row in datasets.load_dataset("json", data_files=files, split="train"))
        return
    stream = datasets.load_dataset(args.dataset_name, args.dataset_config, split=split, streaming=True)
    yield from (row["text"] for row in stream)


def main(argv: list[str] | None = None) -> dict:
    args, training_args = HfArgumentParser((Arguments, TrainingArguments)).parse_args_into_dataclasses(args=argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=training_dtype(args.dtype))
    if not args.dense:
        qsparse_hf.convert_to_qsparse(model, topk=args.topk)
    gen = lambda files, split: (lambda: packed_blocks(_texts(files, args, split), tokenizer, args.block_size))  # noqa
    if args.train_file:
        train = datasets.Dataset.from_generator(gen(args.train_file, "train"))
    else:  # streaming: an IterableDataset, so --max_steps must be set
        train = datasets.IterableDataset.from_generator(gen(None, "train"))
    eval_source = args.validation_file or args.train_file
    evaluation = datasets.Dataset.from_list(list(itertools.islice(
        packed_blocks(_texts(eval_source, args, "train"), tokenizer, args.block_size), args.max_eval_blocks)))
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                      processing_class=tokenizer, data_collator=default_data_collator,
                      callbacks=[] if args.dense else [qsparse_hf.QSparseCallback()])
    # Resume an interrupted run from its last complete checkpoint (an explicit --resume_from_checkpoint wins).
    resume = training_args.resume_from_checkpoint or last_complete_checkpoint(training_args.output_dir)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_metrics("train", result.metrics)
    metrics = trainer.evaluate()
    metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50))
    trainer.save_metrics("eval", metrics)
    if trainer.is_world_process_zero():
        save_pretrained_atomic(trainer.model, training_args.output_dir, tokenizer=tokenizer)
        if not args.dense:
            save_model_card(training_args.output_dir, trainer.model, base_model=args.model_name_or_path,
                            datasets=args.train_file or [args.dataset_name],
                            training={"learning_rate": str(training_args.learning_rate),
                                      "max_steps": str(training_args.max_steps), "block_size": str(args.block_size)},
                            eval_results={"eval_loss": metrics["eval_loss"], "perplexity": metrics["perplexity"]})
    return metrics


if __name__ == "__main__":
    main()
