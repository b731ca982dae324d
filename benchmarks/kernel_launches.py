"""Launches per chunk and layer of the Titans memory scan: the fused Triton kernels (`memory_kernels="triton"`,
counted by `hope_hf.memory_triton.LAUNCHES`) and the ATen calls of either path (counted by a dispatch mode; an upper
bound on GPU kernels, since views launch none), for a forward without gradients and a training step (forward and
backward, `recompute_memory_states` off), each as the increment per chunk between two lengths so that what runs once
per layer cancels, and a decoding step; self-modifying (5 memories) and static (1 memory) layers. Counts, not times:
on a CPU the Triton kernels run in Triton's interpreter.

    python benchmarks/kernel_launches.py              # head size 64, chunk 16
    python benchmarks/kernel_launches.py --quick      # small sizes: what CI runs
"""

from __future__ import annotations

import argparse
import os
import sys

if "triton" not in sys.modules:  # kernels on CPU tensors run in Triton's interpreter, set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
from _report import check_sizes, save_report
from torch.utils._python_dispatch import TorchDispatchMode


class AtenCalls(TorchDispatchMode):
    """Counts the ATen operators dispatched inside it, except while `paused`."""

    def __init__(self):
        super().__init__()
        self.calls = self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += not self.paused
        return func(*args, **(kwargs or {}))


class Uncounted:
    """A Triton kernel launched with the count paused: the interpreter's host copies of its arguments are not work
    that a GPU would do."""

    def __init__(self, kernel, mode: AtenCalls):
        self.kernel, self.mode = kernel, mode

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.mode.paused += 1
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                self.mode.paused -= 1

        return launch


KERNELS = ("_linear_chunk_kernel", "_linear_chunk_backward_kernel")


def count(layer, kernels: str, x, state=None, train: bool = False):
    """(Triton launches, ATen calls) of one `forward_with_state` under `memory_kernels=kernels`, without gradients
    or (`train`) with a backward pass of the output's sum."""
    from hope_hf import memory_triton

    layer.config.memory_kernels = kernels
    memory_triton.LAUNCHES.clear()
    originals = {name: getattr(memory_triton, name) for name in KERNELS}
    with torch.set_grad_enabled(train), AtenCalls() as mode:
        for name, kernel in originals.items():
            setattr(memory_triton, name, Uncounted(kernel, mode))
        try:
            out, _ = layer.forward_with_state(x, state=state)
            if train:
                out.sum().backward()
        finally:
            for name, kernel in originals.items():
                setattr(memory_triton, name, kernel)
    return sum(memory_triton.LAUNCHES.values()), mode.calls


def measure(args):
    from hope_hf import HopeConfig
    from hope_hf.memory_hope import HopeSelfModifyingTitans

    rows = []
    for self_modifying in (True, False):
        config = HopeConfig(hidden_size=args.heads * args.head_dim, num_attention_heads=args.heads,
                            chunk_size=args.chunk_size, self_modifying=self_modifying, recompute_memory_states=False)
        layer = HopeSelfModifyingTitans(config, 0)
        layer.init_memory_weights()
        short, long = (torch.randn(1, c * args.chunk_size, config.hidden_size) for c in (args.chunks, 2 * args.chunks))
        with torch.no_grad():
            _, state = layer.forward_with_state(short)
        row = {"self_modifying": self_modifying, "memories": layer.num_memories}
        for kernels in ("triton", "torch"):
            for train in (False, True):
                (launch_a, calls_a), (launch_b, calls_b) = (count(layer, kernels, t, train=train)
                                                            for t in (short, long))
                pass_name = "train" if train else "forward"
                row[f"{kernels}_{pass_name}_launches_per_chunk"] = (launch_b - launch_a) / args.chunks
                row[f"{kernels}_{pass_name}_aten_calls_per_chunk"] = (calls_b - calls_a) / args.chunks
            row[f"{kernels}_launches_per_token_step"], row[f"{kernels}_aten_calls_per_token_step"] = count(
                layer, kernels, short[:, :1], state)
        rows.append(row)
        print(", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=2, help="number of heads")
    parser.add_argument("--head-dim", type=int, default=64, help="head size")
    parser.add_argument("--chunk-size", type=int, default=16, help="chunk size")
    parser.add_argument("--chunks", type=int, default=2, help="chunks of the shorter input (the longer has twice)")
    parser.add_argument("--json", default="benchmarks/results/kernel_launches.json", help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run for CI")
    args = parser.parse_args(argv)
    check_sizes(parser, args, positive=("heads", "head_dim", "chunk_size", "chunks"))
    if args.quick:
        args.heads, args.head_dim, args.chunk_size, args.chunks = 2, 8, 4, 1
    return save_report(args, rows=measure(args))


if __name__ == "__main__":
    main()
