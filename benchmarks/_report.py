"""Shared by the benchmark scripts: the machine header and the JSON file every benchmark writes, and the FLOP
counter."""

from __future__ import annotations

import json
import os
import platform

import torch


def _baddbmm_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    batch, m, k = a_shape
    return 2 * batch * m * k * b_shape[-1]  # the product; the accumulation is not counted, as for baddbmm


def flop_counter():
    """`torch.utils.flop_counter.FlopCounterMode` that also counts the in-place `baddbmm_` (the chunk step
    accumulates its weight updates with it; torch's table has only the out-of-place op)."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.baddbmm_: _baddbmm_flops})


def save_report(args, **results) -> dict:
    """A report with the machine, torch threads and version, the command-line settings and `results`, written
    to `args.json` (if set)."""
    report = {
        "machine": platform.platform(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        **results,
    }
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return report
