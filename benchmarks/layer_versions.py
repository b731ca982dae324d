"""Two versions of the self-modifying Titans layer side by side: is a change to the memory's code faster?

Loads `hope_hf/memory_hope.py` (and the sibling files it imports) as it is now and as it was at a git revision (or
from a folder holding such files), builds the same layer
from both with the same seed, and times forward and forward + backward of `out.sum()` with recomputation off and
on, the two versions interleaved in one process so that they share the machine's state. Times are this process's
CPU time (one torch thread by default), so other jobs on the machine count less; the median of the repeats is kept.

    python benchmarks/layer_versions.py --baseline 271fd4f            # width 128 (tiny), 4 x 2048
    python benchmarks/layer_versions.py --baseline HEAD~1 --hidden 512 --heads 8 --batch 1
    python benchmarks/layer_versions.py --baseline-file hope_hf/memory_hope.py --compile-current   # compiled vs eager
    python benchmarks/layer_versions.py --baseline HEAD --compile-current --compile-baseline       # a change, compiled
    python benchmarks/layer_versions.py --baseline HEAD --documents 1536,128,128,128,128   # packed rows (position ids)
    python benchmarks/layer_versions.py --quick                      # seconds: what CI runs (the file against itself)
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import types

import torch
from _report import save_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CURRENT = os.path.join(ROOT, "hope_hf", "memory_hope.py")


def load_module(name: str, path: str):
    """`memory_hope` of the folder holding `path` (a memory_hope.py), loaded as `{name}.memory_hope` with its
    siblings under the package name `name`, without running the folder's `__init__.py`: two versions of the layer
    live side by side in one process (single-file versions of the layer load the same way)."""
    package = types.ModuleType(name)
    package.__path__ = [os.path.dirname(os.path.abspath(path))]
    sys.modules[name] = package  # the relative imports and dataclasses look their modules up here
    return importlib.import_module(f"{name}.memory_hope")


def baseline_source(args) -> tuple[str, str]:
    """(path of the baseline memory_hope.py, next to the files it imports; its label)."""
    if args.baseline_file:
        return args.baseline_file, args.baseline_file
    try:
        archive = subprocess.run(["git", "archive", args.baseline, "hope_hf"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise SystemExit(f"--baseline {args.baseline!r}: cannot read hope_hf/ from git ({err})")
    folder = tempfile.mkdtemp(prefix="hope_baseline_")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return os.path.join(folder, "hope_hf", "memory_hope.py"), args.baseline


def step_times(layer, x, position_ids=None) -> tuple[float, float]:
    x.grad = None
    start = time.process_time()
    out, _ = layer.forward_with_state(x, position_ids=position_ids)
    mid = time.process_time()
    out.sum().backward()
    layer.zero_grad(set_to_none=True)
    return mid - start, time.process_time() - start


def measure(args) -> list[dict]:
    from hope_hf import HopeConfig

    path, label = baseline_source(args)
    versions = {"baseline": load_module("baseline_memory_hope", path),
                "current": load_module("current_memory_hope", CURRENT)}
    x = torch.randn(args.batch, args.length, args.hidden, requires_grad=True)
    position_ids = None
    if args.documents:  # every row packs the same documents: position ids restart at 0 for each
        position_ids = torch.cat([torch.arange(n) for n in args.documents]).expand(args.batch, -1)
    rows = []
    print(f"baseline: {label}; width {args.hidden}, {args.heads} heads, {args.batch} x {args.length}, "
          f"chunk {args.chunk_size}" + (f", documents {args.documents} per row" if args.documents else ""))
    print(f"{'recompute':>9} | {'baseline fwd':>12} {'step':>7} | {'current fwd':>11} {'step':>7} | "
          f"{'step speed-up':>13}")
    for recompute in (False, True):
        layers = {}
        for name, module in versions.items():
            config = HopeConfig(vocab_size=128, hidden_size=args.hidden, num_attention_heads=args.heads,
                                num_hidden_layers=1, chunk_size=args.chunk_size, recompute_memory_states=recompute,
                                compile_chunk_step=args.compile_current and name == "current"
                                or args.compile_baseline and name == "baseline")
            torch.manual_seed(0)
            layers[name] = module.HopeSelfModifyingTitans(config, 0)
            layers[name].init_memory_weights()
        times = {name: [] for name in layers}
        for repeat in range(args.repeats + 1):  # the first round warms up
            for name, layer in layers.items():
                measured = step_times(layer, x, position_ids)
                if repeat:
                    times[name].append(measured)
        median = {name: (statistics.median(f for f, _ in t), statistics.median(s for _, s in t))
                  for name, t in times.items()}
        row = {"recompute_memory_states": recompute, "step_speedup": median["baseline"][1] / median["current"][1]}
        for name, (forward, step) in median.items():
            row[f"{name}_forward_seconds"], row[f"{name}_step_seconds"] = forward, step
        rows.append(row)
        print(f"{str(recompute):>9} | {median['baseline'][0]:>12.3f} {median['baseline'][1]:>7.3f} | "
              f"{median['current'][0]:>11.3f} {median['current'][1]:>7.3f} | {row['step_speedup']:>12.2f}x")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="HEAD", help="git revision of the baseline (default: HEAD)")
    parser.add_argument("--baseline-file", help="a memory_hope.py file to compare against instead of a git revision")
    parser.add_argument("--hidden", type=int, default=128, help="width (default: 128, the tiny preset's)")
    parser.add_argument("--heads", type=int, default=4, help="heads (default: 4)")
    parser.add_argument("--batch", type=int, default=4, help="sequences (default: 4)")
    parser.add_argument("--length", type=int, default=2048, help="tokens per sequence (default: 2048)")
    parser.add_argument("--chunk-size", type=int, default=16, help="chunk size (default: 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after a warm-up; the median is kept")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--compile-current", action="store_true",
                        help="the current version with compile_chunk_step=True (the warm-up round compiles); with "
                             "--baseline-file hope_hf/memory_hope.py: compiled against eager, same code")
    parser.add_argument("--compile-baseline", action="store_true",
                        help="the baseline with compile_chunk_step=True; with --compile-current: is a change faster "
                             "when both versions are compiled?")
    parser.add_argument("--documents", type=lambda text: [int(n) for n in text.split(",")],
                        help="comma-separated document lengths that every row packs (summing to --length), e.g. "
                             "1536,128,128,128,128; default: one document per row")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, the current file against itself")
    parser.add_argument("--json", default="benchmarks/results/layer_versions.json", help="where to write the results")
    args = parser.parse_args(argv)
    for name in ("hidden", "heads", "batch", "length", "chunk_size", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    torch.set_num_threads(args.threads)
    if args.quick:
        args.hidden, args.heads, args.batch, args.length, args.repeats = 32, 2, 1, 64, 1
        args.documents = [48, 16] if args.documents else None
        args.baseline_file = args.baseline_file or CURRENT
    if args.documents and (min(args.documents) < 1 or sum(args.documents) != args.length):
        parser.error(f"--documents must be lengths >= 1 that sum to --length ({args.length}), got {args.documents}")
    return save_report(args, rows=measure(args))


if __name__ == "__main__":
    main()
