"""FSDP2 (torch `fully_shard`) training of a tiny HOPE model on CPU/gloo with ContinuumOptimizer.

    torchrun --nproc_per_node 2 fsdp2_train.py OUT_DIR

Every decoder layer (the model's `_no_split_modules`) and then the whole model are sharded; each rank trains on its
half of a fixed global batch of 4 rows for 4 steps with activation checkpointing on; the full state dict is gathered
and rank 0 saves it with `save_pretrained` to OUT_DIR/model.
"""

import gc
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/ (for _training_utils)

STEPS, PERIODS = 4, (16, 100, 0)


def batches():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 97, (4, 17), generator=g) for _ in range(STEPS)]


def main(out_dir: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from _training_utils import tiny_model
    from hope_hf import HopeForCausalLM
    from hope_hf.training import ContinuumOptimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = tiny_model(periods=PERIODS)
    model.activation_checkpointing_enable() if hasattr(model, "activation_checkpointing_enable") else \
        model.gradient_checkpointing_enable()
    model.train()
    no_split = tuple(m for m in model.modules() if type(m).__name__ in model._no_split_modules)
    assert no_split, model._no_split_modules
    for layer in no_split:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    opt = ContinuumOptimizer.from_model(model, lr=1e-2)
    losses = []
    per_rank = 4 // world
    for ids in batches():
        mine = ids[rank * per_rank:(rank + 1) * per_rank]
        loss = model(input_ids=mine, labels=mine).loss  # equal token counts per rank: the mean of means is global
        loss.backward()
        opt.step()
        opt.zero_grad()
        reduced = loss.detach().clone()
        dist.all_reduce(reduced)
        losses.append(reduced.item() / world)
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        plain = HopeForCausalLM(model.config)
        plain.load_state_dict(sd, strict=False)  # the tied lm_head is not in the gathered dict
        plain.save_pretrained(os.path.join(out_dir, "model"))
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump({"losses": losses, "level_steps": opt.level_steps, "total_tokens": opt.total_tokens}, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
    gc.collect()  # the sharded model and optimizer go before the group they use (see ddp_train.py)
    dist.destroy_process_group()
