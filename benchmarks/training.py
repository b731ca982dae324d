"""Training throughput and peak training memory of whole models: HOPE against Llama of the same parameter count.

For each preset and sequence length it times full training steps (forward, loss, backward) of `HopeForCausalLM` and
of a `LlamaForCausalLM` (sdpa) with the same width, depth, heads, vocabulary and parameter count (see
`decode.llama_like`), and measures the peak resident memory of each step. Every (model, preset, length) runs in its
own subprocess, so the peak memory of one never hides another's: the reported figure is the peak resident memory of
that process minus its resident memory just before the model was built (weights, gradients, activations and the
allocator's slack). On a CPU read the ratios, not the absolute numbers.

    python benchmarks/training.py                     # tiny + small at 2048 / 8192, batch 4
    python benchmarks/training.py --mixer-breakdown   # also: memory scan vs attention vs the rest of each step
    python benchmarks/training.py --quick             # seconds: what CI runs (asserts nothing about time)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from _report import check_sizes, save_report

HERE = os.path.dirname(os.path.abspath(__file__))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(kind: str, preset: str, overrides: dict):
    from decode import llama_like

    from hope_hf import HopeForCausalLM
    from hope_hf.presets import get_preset

    config = get_preset(preset, **overrides)
    torch.manual_seed(0)
    hope = HopeForCausalLM(config)
    if kind == "hope":
        return hope, config.vocab_size
    llama = llama_like(config)
    del hope
    return llama, config.vocab_size


def replace_mixer_core():
    """Stand-ins for the token mixers: HOPE's Titans layer and Llama's attention become `o_proj(q_proj(x))`, so that
    a model's step time minus its stand-in's is what the memory scan (HOPE) or the attention (Llama) costs, beyond
    two projections that both mixers have."""
    from transformers.models.llama import modeling_llama

    from hope_hf.memory_hope import HopeSelfModifyingTitans

    HopeSelfModifyingTitans.forward = lambda self, hidden_states, *a, **k: self.o_proj(self.q_proj(hidden_states))
    modeling_llama.LlamaAttention.forward = (
        lambda self, hidden_states, *a, **k: (self.o_proj(self.q_proj(hidden_states)), None))


def one(args) -> dict:
    """Runs inside the subprocess: time `repeats` training steps of one model at one length."""
    torch.set_num_threads(args.threads)
    if args.stand_in:
        replace_mixer_core()
    overrides = json.loads(args.overrides)
    base = rss_mib()
    model, vocab = build(args.one, args.preset, overrides)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, vocab, (args.batch, args.length), generator=torch.Generator().manual_seed(0))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss)

    step()  # warm-up (allocator, lazy init)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "model": args.one,
        "preset": args.preset,
        "length": args.length,
        "batch": args.batch,
        "parameters": params,
        "step_seconds": seconds,
        "tokens_per_second": args.batch * args.length / seconds,
        "peak_memory_mib": peak_rss_mib() - base,
    }


def run_one(args, kind, preset, length, stand_in=False) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", kind, "--preset", preset, "--length", str(length),
           "--batch", str(args.batch), "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--overrides", args.overrides] + (["--stand-in"] if stand_in else [])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"model": kind, "preset": preset, "length": length, "error": f"exit {out.returncode}: {tail[0]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(args) -> list[dict]:
    rows = []
    print(f"{'preset':>6} {'length':>6} | {'HOPE tok/s':>10} {'Llama tok/s':>11} {'ratio':>6} | "
          f"{'HOPE MiB':>9} {'Llama MiB':>9} {'ratio':>6}")
    for preset in args.presets:
        for length in args.lengths:
            hope = run_one(args, "hope", preset, length)
            llama = run_one(args, "llama", preset, length)
            row = {"preset": preset, "length": length, "batch": args.batch, "hope": hope, "llama": llama}
            if "error" in hope or "error" in llama:
                print(f"{preset:>6} {length:>6} | error: {hope.get('error') or llama.get('error')}")
            else:
                row["speed_ratio"] = hope["tokens_per_second"] / llama["tokens_per_second"]
                row["memory_ratio"] = hope["peak_memory_mib"] / llama["peak_memory_mib"]
                print(f"{preset:>6} {length:>6} | {hope['tokens_per_second']:>10.0f} "
                      f"{llama['tokens_per_second']:>11.0f} "
                      f"{row['speed_ratio']:>5.2f}x | {hope['peak_memory_mib']:>9.0f} {llama['peak_memory_mib']:>9.0f} "
                      f"{row['memory_ratio']:>5.2f}x")
                if args.mixer_breakdown:
                    add_breakdown(args, row)
            rows.append(row)
    return rows


def add_breakdown(args, row):
    """Each model's step split into its token mixer's core (the step minus the stand-in's, `replace_mixer_core`)
    and the rest (embedding, head and loss, MLPs or CMS, norms, two projections)."""
    for kind in ("hope", "llama"):
        stand_in = run_one(args, kind, row["preset"], row["length"], stand_in=True)
        if "error" in stand_in:
            row[f"{kind}_stand_in"] = stand_in
            return
        row[f"{kind}_stand_in"] = stand_in
        row[f"{kind}_mixer_seconds"] = row[kind]["step_seconds"] - stand_in["step_seconds"]
        row[f"{kind}_rest_seconds"] = stand_in["step_seconds"]
    print(f"{'':>13} | step s: HOPE {row['hope']['step_seconds']:.2f} = memory scan {row['hope_mixer_seconds']:.2f} + "
          f"rest {row['hope_rest_seconds']:.2f}; Llama {row['llama']['step_seconds']:.2f} = attention "
          f"{row['llama_mixer_seconds']:.2f} + rest {row['llama_rest_seconds']:.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", type=lambda s: s.split(","), default=["tiny", "small"],
                        help="comma-separated presets (default: tiny,small)")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 8192],
                        help="comma-separated sequence lengths (default: 2048,8192)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default: 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--overrides", default="{}",
                        help='JSON of config overrides applied to every preset, e.g. \'{"chunk_size": 64}\'')
    parser.add_argument("--mixer-breakdown", action="store_true",
                        help="also time each model with its token mixer's core replaced by two projections (HOPE's "
                             "memory scan, Llama's attention): where the difference between the models lies")
    parser.add_argument("--quick", action="store_true", help="tiny preset, 256-word vocabulary, short lengths")
    parser.add_argument("--json", default="benchmarks/results/training.json", help="where to write the results")
    parser.add_argument("--one", choices=["hope", "llama"], help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stand-in", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args)))
        return None
    check_sizes(parser, args, positive=("lengths", "batch", "repeats", "threads"))
    try:
        overrides = json.loads(args.overrides)
    except json.JSONDecodeError as err:
        parser.error(f"--overrides is not JSON: {err}")
    if not isinstance(overrides, dict):
        parser.error(f"--overrides must be a JSON object of config fields, got {args.overrides}")
    from hope_hf.presets import get_preset

    for preset in args.presets:  # an unknown preset or config field: refused here, not in every row's subprocess
        try:
            get_preset(preset, **overrides)
        except ValueError as err:
            parser.error(f"--presets / --overrides: {err}")
    if args.quick:
        args.presets, args.lengths, args.batch, args.repeats = ["tiny"], [64, 128], 2, 1
        args.overrides = json.dumps({"vocab_size": 256, **json.loads(args.overrides)})
    rows = measure(args)
    return save_report(args, rows=rows)


if __name__ == "__main__":
    main()
