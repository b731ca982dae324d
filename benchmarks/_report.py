"""Shared by the benchmark scripts: the machine header and the JSON file every benchmark writes, and the FLOP
counter."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import torch


def _baddbmm_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    batch, m, k = a_shape
    return 2 * batch * m * k * b_shape[-1]  # the product; the accumulation is not counted, as for baddbmm


def flop_counter():
    """`torch.utils.flop_counter.FlopCounterMode` that also counts the in-place `baddbmm_` (the chunk step
    accumulates its weight updates with it; torch's table has only the out-of-place op)."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.baddbmm_: _baddbmm_flops})


def check_sizes(parser, args, positive=(), nonnegative=()) -> None:
    """`parser.error` naming the first option (attribute names in `positive` / `nonnegative`, each an int, a list
    of ints or of int tuples, or None) with a value below 1 / below 0."""
    for names, low in ((positive, 1), (nonnegative, 0)):
        for name in names:
            value = getattr(args, name)
            items = value if isinstance(value, (list, tuple)) else [value]
            flat = [v for item in items if item is not None for v in (item if isinstance(item, tuple) else (item,))]
            if any(v < low for v in flat) or (isinstance(value, list) and not value):
                parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def source_state(*paths: str) -> tuple[str | None, bool]:
    """(the commit of the checkout the benchmark runs from, whether its tracked files under `paths` (all if none)
    differ from it); (None, False) outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *paths], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None, False
    return commit, bool(dirty)


def save_report(args, **results) -> dict:
    """A report with the machine, torch threads, the versions and commit that ran, the command-line settings and
    `results`, written to `args.json` (if set)."""
    import transformers

    commit, changed = source_state()
    report = {
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "commit": "unknown (not a git checkout)" if commit is None else commit + ("+changes" if changed else ""),
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        **results,
    }
    if args.json:
        path = args.json
        if not os.path.isabs(path) and path.startswith("benchmarks" + os.sep):  # the default: from any folder
            path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {path}")
    return report
