"""DDP (or single-process) HopeTrainer run used by tests/model/test_distributed.py.

    accelerate launch --multi_gpu --num_processes 2 ... ddp_train.py OUT_DIR      (2 ranks x batch 2)
    python ddp_train.py OUT_DIR                                                   (1 process x batch 4)

Same model, data and global batch of 4 rows either way; rows carry different numbers of loss tokens, so the result
matches only if the token counts are global (Trainer's num_items_in_batch, ContinuumOptimizer's all-reduce).
Rank 0 writes the final weights to OUT_DIR/weights.pt; every rank writes OUT_DIR/rank{r}.json with its CMS counters.
"""

import gc
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/ (for _training_utils)


def main(out_dir: str) -> None:
    from datasets import Dataset
    from transformers import TrainingArguments

    from _training_utils import tiny_model
    from hope_hf.training import HopeTrainer

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (16, 17), generator=g)
    labels = ids.clone()
    for i in range(16):
        labels[i, 3 + (7 * i) % 14:] = -100
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "trainer"), use_cpu=True, report_to="none", disable_tqdm=True, seed=0,
        per_device_train_batch_size=4 // world, max_steps=4, learning_rate=1e-2, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", dataloader_num_workers=0, weight_decay=0.0,
    )
    trainer = HopeTrainer(model=tiny_model(periods=(16, 60, 0)), args=args, train_dataset=data)
    trainer.train()
    opt = trainer.continuum_optimizer
    rank = args.process_index
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"world": args.world_size, "level_steps": opt.level_steps, "total_tokens": opt.total_tokens,
                   "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
                   "distributed_type": str(trainer.accelerator.distributed_type)}, f)
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                   os.path.join(out_dir, "weights.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
    # Leave the gloo group before exiting (torn down at interpreter exit it aborted a rank once), but only after
    # main's Trainer and DDP model are gone: destroyed after the group, a rank hung in their teardown now and then
    # (2 of 8 launches on one machine) and the launcher, and the test, waited forever. The CLI ends the same way.
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
