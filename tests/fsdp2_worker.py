"""Run by tests/test_distributed.py under torchrun (2 CPU ranks, gloo): FSDP2 (`fully_shard`) on a converted model.

Shards every decoder layer and the root, checks the weights are DTensors, runs a few training steps on fixed data,
gathers the full state dict and (rank 0) saves a checkpoint with it; prints the losses as JSON.
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

import qsparse_hf


def main(model_path: str, output: str, steps: int = 3) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    qsparse_hf.convert_to_qsparse(model, topk=0.7)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = [p for p in model.parameters() if isinstance(p, DTensor)]
    assert len(sharded) == len(list(model.parameters())), "every parameter should be a DTensor"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # see the test: SGD shows a gradient's scale
    batch = torch.randint(3, model.config.vocab_size, (2 * world, 24), generator=torch.Generator().manual_seed(1))
    mine = batch[rank * 2:(rank + 1) * 2]  # this rank's half of the global batch
    losses = []
    for _ in range(steps):
        loss = model(mine, labels=mine).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        dense_copy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        qsparse_hf.convert_to_qsparse(dense_copy, topk=0.7)
        dense_copy.load_state_dict(state)
        dense_copy.save_pretrained(output)
        print("LOSSES " + json.dumps(losses), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
