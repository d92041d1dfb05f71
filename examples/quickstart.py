"""Q-Sparse in one minute: load a causal LM, convert it, inspect its sparsity, compare perplexity, generate,
save and reload.

    python examples/quickstart.py                                   # offline, CPU, ~20 s
    python examples/quickstart.py --model mistralai/Mistral-7B-v0.1 --text-file my_text.txt --topk 0.5

By default it uses ../shared/fixtures/mistral-tiny when that folder exists beside the repository, otherwise the
small pretrained model shipped in examples/models/mistral-micro, so it runs on a fresh clone with no network.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import qsparse_hf
from qsparse_hf.evaluation import perplexity

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "fixtures"
DEFAULT_MODEL = SHARED / "mistral-tiny" if (SHARED / "mistral-tiny").exists() else HERE / "models" / "mistral-micro"
DEFAULT_TEXT = SHARED / "heldout_text.txt" if (SHARED / "heldout_text.txt").exists() else HERE / "data" / "sample_text.txt"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="hub id or local path of a causal LM")
    parser.add_argument("--topk", type=float, default=0.7, help="fraction of each projection's input kept per token")
    parser.add_argument("--text-file", default=str(DEFAULT_TEXT), help="text for perplexity and the sparsity report")
    parser.add_argument("--max-chars", type=int, default=20000, help="characters of the text file to use")
    parser.add_argument("--prompt", default="The for statement in Python", help="prompt for greedy generation")
    parser.add_argument("--output", default=None, help="where to save the converted model (default: a temp dir)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.time()
    print(f"model: {args.model}\ntext:  {args.text_file}")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    text = Path(args.text_file).read_text()[: args.max_chars]

    dense_ppl = perplexity(model, tokenizer, text)
    prompt = tokenizer(args.prompt, return_tensors="pt").input_ids

    qsparse_hf.convert_to_qsparse(model, topk=args.topk)
    sparse_ppl = perplexity(model, tokenizer, text)
    report = qsparse_hf.sparsity_report(model, tokenizer(text[:4000], return_tensors="pt").input_ids[:, :512])
    print(f"\n{report}\n")
    print(f"perplexity dense: {dense_ppl:.2f}   Q-Sparse topk={args.topk}: {sparse_ppl:.2f} (no training)")

    generated = model.generate(prompt, max_new_tokens=24, do_sample=False)
    print("greedy:", tokenizer.decode(generated[0], skip_special_tokens=True).replace("\n", " "))

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.output or tmp
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            same = torch.equal(model(prompt).logits, reloaded(prompt).logits)
        print(f"saved to {out_dir} and reloaded: {type(reloaded.model.layers[0].mlp.down_proj).__name__}, "
              f"logits bit-identical: {same}")
    print(f"done in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
