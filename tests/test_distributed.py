"""Multi-process training on 2 CPU ranks (gloo): DDP through accelerate's launcher, FSDP2 (`fully_shard`)."""

import json
import socket
import subprocess
import sys

import pytest
import torch
from conftest import EMBEDDED_MODEL, REPO, fixture_path
from transformers import AutoModelForCausalLM

import qsparse_hf


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, cwd):
    run = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    return run


def _sft(out, batch):
    return ["--model_name_or_path", str(EMBEDDED_MODEL),
            "--train_file", str(fixture_path("open-orca-sample/train.jsonl")),
            "--validation_file", str(fixture_path("open-orca-sample/validation.jsonl")),
            "--max_train_samples", "64", "--max_eval_samples", "16", "--max_seq_length", "96", "--max_steps", "3",
            "--learning_rate", "5e-4", "--report_to", "none", "--dtype", "float32", "--save_strategy", "no",
            "--seed", "0", "--logging_steps", "1", "--use_cpu", "True", "--topk", "0.7",
            "--per_device_train_batch_size", str(batch), "--output_dir", str(out)]




def _logged(stdout: str) -> list[dict]:
    import ast

    return [ast.literal_eval(line[line.index("{'loss'"):line.index("}", line.index("{'loss'")) + 1])
            for line in stdout.replace("\r", "\n").splitlines() if "{'loss'" in line]


def _assert_same_weights(model, reference, atol):
    # Weights, not logits: a difference in the last bits (another reduction order) can move a near-tie at the top-K
    # cut-off and so change logits visibly; see the README on near-ties.
    expected = reference.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=atol, rtol=0, msg=name)


def test_ddp_on_two_cpu_ranks_trains_as_one_process_with_the_same_global_batch(tmp_path):
    script = str(REPO / "examples" / "finetune_open_orca.py")
    single = _run([sys.executable, script, *_sft(tmp_path / "one", batch=8)], tmp_path)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "examples" / "accelerate" / "ddp_cpu.yaml"), "--main_process_port", str(_free_port())]
    ddp = _run([*launch, script, *_sft(tmp_path / "two", batch=4)], tmp_path)
    one, two = _logged(single.stdout + single.stderr), _logged(ddp.stdout + ddp.stderr)
    assert len(one) == len(two) == 3, (one, two)
    for a, b in zip(one, two):
        assert float(a["epoch"]) == float(b["epoch"])  # two ranks of 4 = one global batch of 8
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=2e-3)
        for key in ("sparsity/q_proj", "sparsity/down_proj", "sparsity/overall"):
            assert float(b[key]) == pytest.approx(float(a[key]), abs=0.005), key
    results = json.loads((tmp_path / "two" / "all_results.json").read_text())
    assert results["eval_sparsity/q_proj"] == pytest.approx(1 - 89 / 128, abs=0.002)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "two", dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "one", dtype=torch.float32)
    assert qsparse_hf.is_qsparse_model(reloaded)
    _assert_same_weights(reloaded, reference, atol=1e-4)


def test_fsdp2_shards_a_converted_model_trains_and_saves_a_full_sparse_checkpoint(tmp_path):
    out = tmp_path / "fsdp"
    run = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port()), str(REPO / "tests" / "fsdp2_worker.py"), str(EMBEDDED_MODEL), str(out)], tmp_path)
    losses = json.loads(run.stdout.split("LOSSES ", 1)[1].splitlines()[0])

    # The same steps in one process on the whole global batch.
    torch.manual_seed(0)
    model = qsparse_hf.convert_to_qsparse(AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL, dtype=torch.float32),
                                          topk=0.7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = torch.randint(3, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
    expected = []
    for _ in range(3):
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        expected.append(loss.item())
    assert losses == pytest.approx(expected, rel=1e-4)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert qsparse_hf.is_qsparse_model(reloaded)
    # Plain SGD, so that a gradient summed instead of averaged over the ranks (or sharded wrongly) shows in the
    # weights; AdamW divides each gradient by its own running size, which hides a scale and turns a last-bit
    # difference in a near-zero gradient (two ranks add in another order than one process) into a visible move.
    _assert_same_weights(reloaded, model, atol=1e-5)
