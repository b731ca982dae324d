"""Launches per chunk and layer of the Titans memory scan without gradients: the fused Triton kernels
(`memory_kernels="triton"`, counted by `hope_hf.memory_triton.LAUNCHES`) and the ATen calls of either path (counted
by a dispatch mode; an upper bound on GPU kernels, since views launch none), for a prefill forward (the increment per
chunk between two lengths, so that what runs once per layer cancels) and a decoding step, with self-modifying (5
memories) and static (1 memory) layers. Counts, not times: on a CPU the Triton kernels run in Triton's interpreter.

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


def count(layer, kernels: str, x, state=None):
    """(Triton launches, ATen calls) of one `forward_with_state` without gradients under `memory_kernels=kernels`."""
    from hope_hf import memory_triton

    layer.config.memory_kernels = kernels
    memory_triton.LAUNCHES.clear()
    kernel = memory_triton._linear_chunk_kernel
    with torch.no_grad(), AtenCalls() as mode:
        memory_triton._linear_chunk_kernel = Uncounted(kernel, mode)
        try:
            layer.forward_with_state(x, state=state)
        finally:
            memory_triton._linear_chunk_kernel = kernel
    return memory_triton.LAUNCHES["linear_chunk"], mode.calls


def measure(args):
    from hope_hf import HopeConfig
    from hope_hf.memory_hope import HopeSelfModifyingTitans

    rows = []
    for self_modifying in (True, False):
        config = HopeConfig(hidden_size=args.heads * args.head_dim, num_attention_heads=args.heads,
                            chunk_size=args.chunk_size, self_modifying=self_modifying)
        layer = HopeSelfModifyingTitans(config, 0)
        layer.init_memory_weights()
        short, long = (torch.randn(1, c * args.chunk_size, config.hidden_size) for c in (args.chunks, 2 * args.chunks))
        with torch.no_grad():
            _, state = layer.forward_with_state(short)
        row = {"self_modifying": self_modifying, "memories": layer.num_memories}
        for kernels in ("triton", "torch"):
            (launch_a, calls_a), (launch_b, calls_b) = count(layer, kernels, short), count(layer, kernels, long)
            row[f"{kernels}_launches_per_chunk"] = (launch_b - launch_a) / args.chunks
            row[f"{kernels}_aten_calls_per_chunk"] = (calls_b - calls_a) / args.chunks
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
