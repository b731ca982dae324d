"""Shared by the benchmark scripts: the machine header and the JSON file every benchmark writes."""

from __future__ import annotations

import json
import os
import platform

import torch


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
