"""CPU thread settings on a shared machine: HOPE's speed idle and with another process keeping one core busy.

For each thread setting it measures, in a fresh process, the tokens per second of `stream_prefill` (the memory scan
of the `tiny` preset over a stream) and of training steps (forward, backward, AdamW), once on an idle machine and once
with a busy loop pinned to one core (which this script starts and stops itself). Settings alternate within each round
(A/B/A/B) and the report gives medians over the rounds, each setting's busy/idle slowdown and its speed against
torch's default measured in the same run. The load average before each measurement is recorded: other processes on
the machine disturb the numbers, so compare settings from the same run.

    python benchmarks/cpu_threads.py                       # every setting, 3 rounds
    python benchmarks/cpu_threads.py --settings torch-default free-cores --rounds 5
    python benchmarks/cpu_threads.py --quick               # seconds: what CI runs (asserts nothing about time)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _report import check_sizes, save_report

# name: (environment variables set before torch is imported, what the process does after importing it)
SETTINGS = {
    "torch-default": ({}, None),
    "one-thread": ({}, "one"),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, None),
    "free-cores": ({}, "free"),
    "free-cores+passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, "free"),
}
CONDITIONS = ("idle", "busy")


def apply_setting(name: str) -> str:
    """In the worker, after importing torch: the setting's thread choice; a description of the threads used."""
    import torch

    action = SETTINGS[name][1]
    if action == "one":
        torch.set_num_threads(1)
    elif action == "free":
        from hope_hf.threads import FreeCoreThreads

        chooser = FreeCoreThreads()
        chooser.start()
        return chooser.reason
    return f"{torch.get_num_threads()} threads"


def stream_tokens_per_second(args) -> float:
    import torch

    from hope_hf import HopeForCausalLM
    from hope_hf.presets import get_preset
    from hope_hf.streaming import split_into_pieces, stream_prefill

    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = HopeForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    stream_prefill(model, split_into_pieces(ids[:, : args.piece], args.piece), progress=False)  # warm-up
    start = time.perf_counter()
    stream_prefill(model, split_into_pieces(ids, args.piece), progress=False)
    return args.tokens / (time.perf_counter() - start)


def train_tokens_per_second(args) -> float:
    import torch

    from hope_hf import HopeForCausalLM
    from hope_hf.presets import get_preset

    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = HopeForCausalLM(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(args.train_steps):
        step()
    return args.batch * args.seq_len * args.train_steps / (time.perf_counter() - start)


def worker(args) -> dict:
    """One measurement in this process (run by `measure` in a fresh one); printed as one JSON line."""
    threads = apply_setting(args.worker)
    result = {"threads": threads, "stream_tokens_per_s": stream_tokens_per_second(args)}
    if args.train_steps:
        result["train_tokens_per_s"] = train_tokens_per_second(args)
    print(json.dumps(result), flush=True)
    return result


def start_busy_loop(cpu: int) -> subprocess.Popen:
    """A process that keeps CPU `cpu` busy until stopped."""
    code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait()


def measure(args, setting: str, condition: str) -> dict:
    """One worker process for `setting`, with the busy loop running if `condition` is "busy"."""
    # each setting chooses its own threads: a thread count in this environment would make them all the same
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(SETTINGS[setting][0])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    command = [sys.executable, os.path.abspath(__file__), "--worker", setting, "--tokens", str(args.tokens),
               "--piece", str(args.piece), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
               "--train-steps", str(args.train_steps)]
    load = os.getloadavg()[0]
    busy = start_busy_loop(args.busy_cpu) if condition == "busy" else None
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"{setting:>20} {condition:>4}: over --timeout {args.timeout} s [load {load:.2f}]", flush=True)
        return {"setting": setting, "condition": condition, "load_average_before": load, "timed_out": True}
    finally:
        if busy is not None:
            stop(busy)
    if proc.returncode != 0:
        raise RuntimeError(f"{setting} ({condition}) failed:\n{proc.stderr[-3000:]}")
    row = {"setting": setting, "condition": condition, "load_average_before": load,
           **json.loads(proc.stdout.strip().splitlines()[-1])}
    print(f"{setting:>20} {condition:>4}: stream {row['stream_tokens_per_s']:7.0f} tok/s"
          + (f", train {row['train_tokens_per_s']:6.0f} tok/s" if "train_tokens_per_s" in row else "")
          + f"  [{row['threads']}; load {load:.2f}]", flush=True)
    return row


def summarize(rows: list[dict], settings: list[str]) -> list[dict]:
    """Medians per (setting, condition); each setting's busy/idle slowdown and its speed against torch's default."""
    metrics = [m for m in ("stream_tokens_per_s", "train_tokens_per_s") if any(m in r for r in rows)]
    # a measurement over --timeout counts as 0 tokens/s (slower than any that finished)
    medians = {(s, c, m): statistics.median(r.get(m, 0.0) for r in rows if r["setting"] == s and r["condition"] == c)
               for s in settings for c in CONDITIONS for m in metrics}
    table = []
    for s in settings:
        line = {"setting": s}
        for m in metrics:
            kind = m.split("_")[0]
            idle, busy = medians[(s, "idle", m)], medians[(s, "busy", m)]
            line.update({f"{kind}_idle": idle, f"{kind}_busy": busy,
                         f"{kind}_slowdown_when_busy": idle / busy if busy else float("inf")})
            if "torch-default" in settings:
                for c in CONDITIONS:
                    default = medians[("torch-default", c, m)]
                    line[f"{kind}_{c}_vs_default"] = medians[(s, c, m)] / default if default else float("inf")
        table.append(line)
        print(f"{s:>20}: " + "; ".join(
            f"{m.split('_')[0]} idle {line[m.split('_')[0] + '_idle']:.0f}, busy {line[m.split('_')[0] + '_busy']:.0f}"
            f" tok/s ({line[m.split('_')[0] + '_slowdown_when_busy']:.2f}x slower when busy)" for m in metrics))
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=None, choices=list(SETTINGS),
                        help="thread settings to compare (default: all; --quick: one-thread free-cores)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; every setting and condition once per round")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens streamed through the tiny preset")
    parser.add_argument("--piece", type=int, default=2048, help="tokens per piece of the stream")
    parser.add_argument("--batch", type=int, default=8, help="sequences per training step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    parser.add_argument("--train-steps", type=int, default=3, help="timed training steps (0: no training)")
    parser.add_argument("--busy-cpu", type=int, default=None, help="the CPU the busy loop runs on (default: the last "
                        "one this process may use)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds one measurement may take")
    parser.add_argument("--worker", choices=list(SETTINGS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default="benchmarks/results/cpu_threads.json", help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run for CI")
    args = parser.parse_args(argv)
    check_sizes(parser, args, positive=("rounds", "tokens", "piece", "batch", "seq_len", "timeout"),
                nonnegative=("train_steps",))
    if args.worker:
        return worker(args)
    cpus = sorted(os.sched_getaffinity(0))
    if args.busy_cpu is None:
        args.busy_cpu = cpus[-1]
    elif args.busy_cpu not in cpus:
        parser.error(f"--busy-cpu must be one of the CPUs this process may use ({cpus}), got {args.busy_cpu}")
    if args.settings is None:
        args.settings = ["one-thread", "free-cores"] if args.quick else list(SETTINGS)
    if args.quick:
        args.rounds, args.tokens, args.piece, args.batch, args.seq_len, args.train_steps = 1, 256, 128, 1, 64, 1
    rows = [measure(args, s, c) for _ in range(args.rounds) for s in args.settings for c in CONDITIONS]
    return save_report(args, cpus=len(cpus), rows=rows, table=summarize(rows, args.settings))


if __name__ == "__main__":
    main()
