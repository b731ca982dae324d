"""DDP training with the memory scan replayed from CUDA graphs (`memory_cuda_graphs`); used by
tests/model/test_distributed.py.

    torchrun --nproc_per_node 2 ddp_cuda_graphs_train.py OUT_DIR    (2 ranks x 2 rows, gloo, both ranks on cuda:0)
    python ddp_cuda_graphs_train.py OUT_DIR                          (1 process x 4 rows, no DDP)

Both ranks share the one GPU of a one-GPU machine (gloo all-reduces CUDA tensors; NCCL refuses two ranks on one
device). Every row carries the same number of loss tokens, so DDP's average of the ranks' mean losses is the
single process's mean loss. Rank 0 writes OUT_DIR/weights.pt; every rank writes OUT_DIR/rank{r}.json with its losses
(averaged over the ranks) and how many times the graphed scan ran.
"""

import gc
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/ (for _training_utils)

STEPS = 3
ROWS = 4


def main(out_dir: str) -> None:
    from _training_utils import tiny_model
    from hope_hf import memory_graphs

    replays = []
    apply = memory_graphs.GraphedScan.apply
    memory_graphs.GraphedScan.apply = lambda *a: replays.append(1) or apply(*a)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    device = torch.device("cuda", 0)
    model = tiny_model(periods=(16, 0), memory_cuda_graphs=True).to(device)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    ids = torch.randint(0, 97, (ROWS, 32), generator=torch.Generator().manual_seed(0)).to(device)
    rows = ROWS // world
    batch = ids[rank * rows:(rank + 1) * rows]  # the same rows every step: the loss must fall
    losses = []
    for _ in range(STEPS):
        loss = wrapped(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"world": world, "losses": losses, "replays": len(replays)}, f)
    if rank == 0:
        torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                   os.path.join(out_dir, "weights.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
    gc.collect()  # the DDP model goes before the group it uses (see ddp_train.py)
    if dist.is_initialized():
        dist.destroy_process_group()
