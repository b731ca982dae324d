#!/usr/bin/env python
"""Long-context study: retrieval at long context and continual learning of changing facts, on one CPU in about an hour.

What it does, deterministically for ``--seed``:

1. Trains a 1,024-token byte-level BPE tokenizer on the embedded corpus (the standard library's source, no download).
2. Builds four models of (nearly) the same parameter count: ``hope`` (the ``tiny`` preset: 2 self-modifying Titans
   layers x 128, CMS levels at 16 / 2,048 tokens), ``hope_no_selfmod`` (``self_modifying=False``, CMS widened to
   the same parameter count), ``hope_1level`` (one CMS level at 16 tokens, as wide as the two levels together) and
   ``llama`` (``benchmarks/decode.py::llama_like``: a Llama of the same width, depth, heads and vocabulary whose MLP
   width matches the parameter count; sdpa attention, RoPE).
3. Trains each identically (same batches in the same order, same steps, AdamW, schedule, seed) on a retrieval
   curriculum built from the suite's own task generators (passkey / number / word / mqar / babilong at random
   depths), the sequence length ramping 256 -> 512 -> 1,024 tokens at a constant number of tokens per step.
   Loss: mean next-token loss over all tokens plus the mean loss over the answer tokens (docs/results.md says why).
4. Evaluates each at 1K, 4K, 16K and 64K tokens with ``hope_hf.evaluation`` (context streamed through the recurrent
   ``HopeCache``; Llama prefilled in pieces into its ``DynamicCache``; greedy answers, shipped metrics), fewer
   tasks and examples at the long lengths, needle depths 0.1 / 0.5 / 0.9.
5. Continual learning: a stream of key -> value statements in noise, half of the values reassigned in the second
   half of the stream, run through ``StreamLearner`` (each CMS level updated at its own period with summed
   gradients) on the trained ``hope`` (two levels) and ``hope_1level`` (one level), at several learning rates (0 =
   no weight updates, the recurrent memory only). After the stream (and at its middle) every key is queried:
   greedy answer and log-probability of the latest and the superseded value.

Writes ``study.json`` (settings, machine, every loss, accuracy, timing and answer) and plots into ``--output_dir``.

    python studies/long_context.py --output_dir study-out --threads 1        # the full study (about an hour)
    python studies/long_context.py --output_dir /tmp/q --quick               # the same code in seconds (tests)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "benchmarks"):  # the package from this checkout; llama_like from benchmarks/decode.py
    if str(_p) not in sys.path:
        sys.path.insert(0 if _p == ROOT else len(sys.path), str(_p))

MODELS = ("hope", "hope_no_selfmod", "hope_1level", "llama")
TASKS = ("passkey", "number", "word", "mqar", "babilong")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Long-context study: train tiny HOPE, HOPE without self-modification, HOPE with one CMS level and "
                    "a same-size Llama on a 1K retrieval curriculum; evaluate from 1K to 64K; continual learning of "
                    "changing facts with two CMS levels against one. Deterministic for --seed.")
    p.add_argument("--output_dir", required=True, help="where study.json and the plots go (created)")
    p.add_argument("--quick", action="store_true", help="tiny sizes everywhere: the whole pipeline in seconds")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; also set OMP_NUM_THREADS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    p.add_argument("--vocab_size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=None, help="training steps (default 90; quick 2)")
    p.add_argument("--tokens_per_step", type=int, default=None,
                   help="tokens per batch, constant along the curriculum (default 4096; quick 512)")
    p.add_argument("--train_lengths", default=None, help="curriculum lengths, equal thirds (default 256,512,1024)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (warm-up 10%%, cosine to 10%%)")
    p.add_argument("--eval_lengths", default=None, help="default 1k,4k,16k,64k (quick: 256,320)")
    p.add_argument("--depths", default=None, help="needle depths (default 0.1,0.5,0.9; quick 0.5)")
    p.add_argument("--piece_size", type=int, default=2048, help="tokens per prefill piece (HOPE and Llama)")
    p.add_argument("--continual_lrs", default=None, help="stream-learner learning rates (default 0,1e-3)")
    p.add_argument("--continual_streams", type=int, default=None, help="streams per condition (default 2; quick 1)")
    p.add_argument("--continual_length", type=int, default=None, help="tokens per stream (default 4096; quick 256)")
    p.add_argument("--skip_continual", action="store_true")
    p.add_argument("--no_plots", action="store_true")
    p.add_argument("--no_progress", action="store_true", help="no progress bars (log lines only)")
    p.add_argument("--save_models", action="store_true",
                   help="also save every trained model and the tokenizer under OUTPUT_DIR/models/NAME")
    p.add_argument("--report_only", action="store_true",
                   help="only (re)write report.md and the plots from an existing OUTPUT_DIR/study.json")
    args = p.parse_args(argv)
    q = args.quick
    args.steps = args.steps or (2 if q else 90)
    args.tokens_per_step = args.tokens_per_step or (512 if q else 4096)
    args.train_lengths = [int(x) for x in (args.train_lengths or ("256" if q else "256,512,1024")).split(",")]
    from hope_hf.evaluation.tasks import parse_depths, parse_lengths

    args.eval_lengths = parse_lengths(args.eval_lengths or ("256,320" if q else "1k,4k,16k,64k"))
    args.depths = parse_depths(args.depths or ("0.5" if q else "0.1,0.5,0.9"))
    args.continual_lrs = [float(x) for x in (args.continual_lrs or "0,1e-3").split(",")]
    args.continual_streams = args.continual_streams or (1 if q else 2)
    args.continual_length = args.continual_length or (256 if q else 4096)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        p.error(f"unknown model(s) {bad}; choose from {', '.join(MODELS)}")
    if min(args.train_lengths) < 256:
        p.error("--train_lengths must be >= 256 tokens (the mqar / babilong examples need room)")
    return args


def eval_plan(length: int, quick: bool) -> tuple[list[str], int]:
    """(tasks, samples per depth) at ``length``: every task at short lengths, fewer and fewer examples beyond."""
    if quick:
        return ["passkey", "mqar"], 1
    if length <= 1024:
        return list(TASKS), 2
    if length <= 4096:
        return list(TASKS), 1
    if length <= 16384:
        return ["passkey", "babilong"], 1
    return ["passkey"], 1


class Log:
    def __init__(self):
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:7.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ models
def build_configs(tok):
    from hope_hf.presets import count_parameters, get_preset

    kw = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
              bos_token_id=tok.bos_token_id)
    base = get_preset("tiny", **kw)
    target = count_parameters(base)

    def matched(make):  # the CMS width that brings the variant closest to the base parameter count
        lo, hi = count_parameters(make(64)), count_parameters(make(65))  # linear in the width
        best = 64 + round((target - lo) / (hi - lo))
        return make(min((best - 1, best, best + 1), key=lambda w: abs(count_parameters(make(w)) - target)))

    nosm = matched(lambda w: get_preset("tiny", self_modifying=False,
                                        cms_levels=[{"period": p, "intermediate_size": w} for p in (16, 2048)], **kw))
    one = matched(lambda w: get_preset("tiny", cms_levels=[{"period": 16, "intermediate_size": w}], **kw))
    return {"hope": base, "hope_no_selfmod": nosm, "hope_1level": one}


def build_model(name, configs, seed):
    import torch

    from hope_hf import HopeForCausalLM

    torch.manual_seed(seed)
    if name == "llama":
        from decode import llama_like  # benchmarks/decode.py

        return llama_like(configs["hope"])
    return HopeForCausalLM(configs[name])


def describe(model) -> dict:
    c = model.config
    out = {"class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
           "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
           "num_attention_heads": c.num_attention_heads}
    if hasattr(c, "cms_levels"):
        out.update(self_modifying=c.self_modifying, cms_levels=c.cms_levels, chunk_size=c.chunk_size)
    else:
        out.update(intermediate_size=c.intermediate_size, attn_implementation=c._attn_implementation)
    return out


# ------------------------------------------------------------------------------------------------ training data
def _ids(tok, text):
    return list(tok(text, add_special_tokens=False)["input_ids"])


def training_examples(tok, length: int, count: int, seed: int, stage: int) -> list[dict]:
    """``count`` curriculum examples of ``length`` tokens (right-padded), tasks in turn, random depths.

    Sequence: context + (query + " answer." for every query) + eos; ``answer`` marks the answer tokens."""
    from hope_hf.evaluation.tasks import build_task_dataset

    rng = random.Random(f"{seed}|train|{stage}|{length}")
    per_task = {t: count // len(TASKS) + (1 if i < count % len(TASKS) else 0) for i, t in enumerate(TASKS)}
    out = []
    for task, n in per_task.items():
        if n == 0:
            continue
        depths = sorted({round(rng.random(), 4) for _ in range(4 * n)})
        depths = rng.sample(depths, n)
        reserve = 100 if task == "mqar" else 24
        ds = build_task_dataset(task, tok, length - reserve, depths=depths, samples=1, seed=10_000 + 97 * seed + stage,
                                max_corpus_chars=300_000)
        for ex in ds:
            ids, ans = list(ex["context_ids"]), []
            for q, a in zip(ex["query_ids"], ex["answers"]):
                ids += q
                a_ids = _ids(tok, " " + a)
                ans += list(range(len(ids), len(ids) + len(a_ids)))
                ids += a_ids + _ids(tok, ".")
            ids.append(tok.eos_token_id)
            if len(ids) > length:
                raise RuntimeError(f"a {task} training example has {len(ids)} > {length} tokens; raise its reserve")
            out.append({"task": task, "ids": ids, "answer": ans})
    rng.shuffle(out)
    return out


def training_batches(tok, args) -> list[dict]:
    """The batches every model sees, in order: the steps split into equal stages, one per curriculum length, each
    step ``tokens_per_step // length`` sequences of ``length`` tokens."""
    import torch

    stages = args.train_lengths
    batches = []
    for stage, length in enumerate(stages):
        lo, hi = stage * args.steps // len(stages), (stage + 1) * args.steps // len(stages)
        bsz = max(1, args.tokens_per_step // length)
        exs = training_examples(tok, length, (hi - lo) * bsz, args.seed, stage)
        for i in range(hi - lo):
            chunk = exs[i * bsz:(i + 1) * bsz]
            ids = torch.full((bsz, length), tok.pad_token_id, dtype=torch.long)
            valid = torch.zeros(bsz, length, dtype=torch.bool)
            answer = torch.zeros(bsz, length, dtype=torch.bool)
            for b, ex in enumerate(chunk):
                ids[b, :len(ex["ids"])] = torch.tensor(ex["ids"])
                valid[b, :len(ex["ids"])] = True
                answer[b, ex["answer"]] = True
            batches.append({"ids": ids, "valid": valid, "answer": answer, "length": length})
    return batches


def train(model, batches, args, log, name) -> dict:
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    n = len(batches)
    warm = max(1, n // 10)

    def lr_at(i):
        if i < warm:
            return (i + 1) / warm
        t = (i - warm) / max(1, n - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    hist = {"step": [], "length": [], "lm_loss": [], "answer_loss": [], "answer_token_accuracy": [], "seconds": []}
    t0 = time.time()
    bar = tqdm(batches, desc=f"train {name}", unit="step", disable=args.no_progress)
    for i, batch in enumerate(bar):
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_at(i)
        ids = batch["ids"]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        targets = ids[:, 1:]
        per_tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                  reduction="none").view_as(targets)
        valid, answer = batch["valid"][:, 1:], batch["answer"][:, 1:]
        loss = per_tok[valid].mean() + per_tok[answer].mean()
        lm, ans = per_tok[valid].detach().mean(), per_tok[answer].detach().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        acc = float((logits.argmax(-1)[answer] == targets[answer]).float().mean())
        for k, v in (("step", i + 1), ("length", batch["length"]), ("lm_loss", float(lm)),
                     ("answer_loss", float(ans)), ("answer_token_accuracy", acc), ("seconds", time.time() - t0)):
            hist[k].append(v)
        bar.set_postfix(lm=f"{float(lm):.3f}", ans=f"{float(ans):.3f}", acc=f"{acc:.2f}", refresh=False)
        if args.no_progress and ((i + 1) % max(1, n // 10) == 0 or i + 1 == n):
            log(f"  {name} step {i + 1}/{n} len {batch['length']}: lm {float(lm):.3f} answer {float(ans):.3f} "
                f"answer-token acc {acc:.2f} ({time.time() - t0:.0f} s)")
    bar.close()
    model.eval()
    hist["train_seconds"] = time.time() - t0
    return hist


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate(model, tok, args, log, name) -> dict:
    from hope_hf.evaluation.runner import run_task
    from hope_hf.evaluation.tasks import format_length

    model.eval()
    out = {"by_task_length": {}, "by_task_length_depth": {}, "mean_by_length": {}, "mean_by_length_depth": {},
           "examples": [], "seconds_by_length": {}}
    for length in args.eval_lengths:
        L = format_length(length)
        tasks, samples = eval_plan(length, args.quick)
        t0 = time.time()
        accs, depth_accs = [], {}
        for task in tasks:
            r = run_task(model, tok, task, [length], depths=args.depths, samples=samples, seed=args.seed,
                         piece_size=args.piece_size, progress=not args.no_progress,
                         log=lambda m: log(f"  {name}: {m.strip()}"))
            out["by_task_length"].setdefault(task, {})[L] = r["by_length"][L]
            out["by_task_length_depth"].setdefault(task, {})[L] = r["by_length_depth"][L]
            accs.append(r["by_length"][L])
            for d, a in r["by_length_depth"][L].items():
                depth_accs.setdefault(d, []).append(a)
            for ex in r["examples"]:
                out["examples"].append({k: ex[k] for k in ("id", "task", "length", "depth", "answers", "predictions",
                                                           "raw", "prefill_seconds", "total_seconds", "cache_bytes")})
        out["mean_by_length"][L] = sum(accs) / len(accs)
        out["mean_by_length_depth"][L] = {d: sum(v) / len(v) for d, v in depth_accs.items()}
        out["seconds_by_length"][L] = time.time() - t0
        log(f"  {name} {L}: mean accuracy over {len(tasks)} task(s) {out['mean_by_length'][L]:.3f} "
            f"({time.time() - t0:.0f} s)")
    return out


# ------------------------------------------------------------------------------------------------ continual learning
def continual_stream(tok, seed: int, index: int, length: int, n_keys: int, n_changed: int) -> dict:
    """A stream of exactly ``length`` tokens: instruction prefix, then noise sentences with ``n_keys`` statements
    "The value of key K is V." at random places of the first half and ``n_changed`` of them restated with a new
    value at random places of the second half (before the last 10%)."""
    from hope_hf.evaluation.tasks import NIAH_PREFIX, NOISE_SENTENCES, WORDS

    rng = random.Random(f"{seed}|continual|{index}")
    keys = rng.sample(WORDS, n_keys)
    old = {k: str(rng.randint(1000, 9999)) for k in keys}
    changed = rng.sample(keys, n_changed)
    new = {}
    for k in changed:
        v = old[k]
        while v == old[k]:
            v = str(rng.randint(1000, 9999))
        new[k] = v
    half = length // 2
    events = [(rng.randrange(length // 16, half - 32), f"The value of key {k} is {old[k]}.") for k in keys]
    events += [(rng.randrange(half, int(0.9 * length)), f"The value of key {k} is {new[k]}.") for k in changed]
    events.sort()
    noise = [_ids(tok, " " + s) for s in NOISE_SENTENCES]
    ids = _ids(tok, NIAH_PREFIX)
    j = 0
    for pos, text in events:
        while len(ids) < pos:
            ids += noise[j % len(noise)]
            j += 1
        ids += _ids(tok, " " + text)
    while len(ids) < length:
        ids += noise[j % len(noise)]
        j += 1
    ids = ids[:length]
    return {"ids": ids, "keys": keys, "old": old, "new": new, "changed": changed, "half": half}


def _query(tok, key):
    return _ids(tok, f" What is the value of key {key}? The value of key {key} is")


def _value_logprob(learner, tok, query, value) -> float:
    import torch

    v = _ids(tok, " " + value)
    total = 0.0
    for i, t in enumerate(v):
        logits = learner.logits(query + v[:i])
        total += float(torch.log_softmax(logits.float(), -1)[t])
    return total


def _probe(learner, tok, stream, stage: str) -> list[dict]:
    from hope_hf.evaluation.runner import extract_answer

    rows = []
    for k in stream["keys"]:
        q = _query(tok, k)
        out = learner.generate(q, max_new_tokens=6, eos_token_id=tok.eos_token_id)
        pred = extract_answer(tok.decode(out, skip_special_tokens=True))
        is_changed = k in stream["new"]
        latest = stream["new"][k] if (is_changed and stage == "end") else stream["old"][k]
        row = {"key": k, "stage": stage, "changed": is_changed, "target": latest, "prediction": pred,
               "correct": pred == latest, "logprob_target": _value_logprob(learner, tok, q, latest)}
        if is_changed and stage == "end":
            row["superseded"] = stream["old"][k]
            row["answered_superseded"] = pred == stream["old"][k]
            row["logprob_superseded"] = _value_logprob(learner, tok, q, stream["old"][k])
        rows.append(row)
    return rows


def continual(models, tok, args, log) -> dict:
    from hope_hf.continual import StreamLearner

    n_keys, n_changed = (2, 1) if args.quick else (12, 6)
    streams = [continual_stream(tok, args.seed, i, args.continual_length, n_keys, n_changed)
               for i in range(args.continual_streams)]
    runs = []
    for name in ("hope", "hope_1level"):
        if name not in models:
            continue
        model = models[name]
        for lr in args.continual_lrs:
            for si, s in enumerate(streams):
                t0 = time.time()
                learner = StreamLearner(model, lr=lr, chunk_size=64, progress=not args.no_progress)
                first = learner.stream([s["ids"][:s["half"]]], total=s["half"])
                mid = _probe(learner, tok, s, "middle")
                second = learner.stream([s["ids"][s["half"]:]], total=len(s["ids"]) - s["half"])
                end = _probe(learner, tok, s, "end")
                run = {"model": name, "periods": learner.periods, "lr": lr, "stream": si,
                       "mean_loss_first_half": first["mean_loss"], "mean_loss_second_half": second["mean_loss"],
                       "level_updates": {str(k): v for k, v in learner.level_updates.items()},
                       "probes": mid + end, "seconds": time.time() - t0}
                run.update(summarize_probes(run["probes"]))
                runs.append(run)
                log(f"  continual {name} lr {lr:g} stream {si}: loss {first['mean_loss']:.3f} -> "
                    f"{second['mean_loss']:.3f}; end: new facts {run['new_accuracy']:.2f}, old unchanged "
                    f"{run['old_accuracy']:.2f}, superseded answered {run['superseded_rate']:.2f} "
                    f"({run['seconds']:.0f} s)")
    summary = {}
    for r in runs:
        key = f"{r['model']}|lr={r['lr']:g}"
        summary.setdefault(key, []).append(r)
    table = {}
    for key, rs in summary.items():
        table[key] = {m: sum(r[m] for r in rs) / len(rs) for m in METRICS}
    return {"n_keys": n_keys, "n_changed": n_changed, "stream_length": args.continual_length,
            "streams": [{k: v for k, v in s.items() if k != "ids"} for s in streams], "runs": runs, "table": table}


METRICS = ("middle_accuracy", "new_accuracy", "old_accuracy", "superseded_rate", "new_logprob", "old_logprob",
           "superseded_logprob", "mean_loss_first_half", "mean_loss_second_half")


def summarize_probes(rows) -> dict:
    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else float("nan")

    mid = [r for r in rows if r["stage"] == "middle"]
    new = [r for r in rows if r["stage"] == "end" and r["changed"]]
    old = [r for r in rows if r["stage"] == "end" and not r["changed"]]
    return {"middle_accuracy": mean(r["correct"] for r in mid), "new_accuracy": mean(r["correct"] for r in new),
            "old_accuracy": mean(r["correct"] for r in old),
            "superseded_rate": mean(r["answered_superseded"] for r in new),
            "new_logprob": mean(r["logprob_target"] for r in new),
            "old_logprob": mean(r["logprob_target"] for r in old),
            "superseded_logprob": mean(r["logprob_superseded"] for r in new)}


# ------------------------------------------------------------------------------------------------ plots
def plots(study: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from hope_hf.evaluation.tasks import parse_lengths

    written = []
    models = study["models"]
    tasks = sorted({t for m in models.values() for t in m["eval"]["by_task_length"]}, key=TASKS.index)
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(3.2 * (len(tasks) + 1), 3.2), sharey=True)
    for ax, task in zip(axes, ["mean"] + tasks):
        for name, m in models.items():
            series = m["eval"]["mean_by_length"] if task == "mean" else m["eval"]["by_task_length"].get(task, {})
            if series:
                xs = [parse_lengths(k)[0] for k in series]
                ax.plot(xs, list(series.values()), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_title("mean over tasks" if task == "mean" else task)
        ax.set_xlabel("context (tokens)")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    written.append(os.path.join(out_dir, "accuracy_by_length.png"))
    fig.savefig(written[-1], dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(models), figsize=(3.0 * len(models), 2.8), squeeze=False)
    for ax, (name, m) in zip(axes[0], models.items()):
        cells = m["eval"]["mean_by_length_depth"]
        lengths = list(cells)
        depths = sorted({d for row in cells.values() for d in row}, key=float)
        grid = [[cells[L].get(d, float("nan")) for L in lengths] for d in depths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_yticks(range(len(depths)), depths)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("context")
        for yi, row in enumerate(grid):
            for xi, v in enumerate(row):
                ax.text(xi, yi, f"{v:.2f}", ha="center", va="center", fontsize=7)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    written.append(os.path.join(out_dir, "accuracy_by_depth.png"))
    fig.savefig(written[-1], dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.0))
    for name, m in models.items():
        h = m["train"]
        for ax, key in zip(axes, ("lm_loss", "answer_loss", "answer_token_accuracy")):
            ax.plot(h["step"], h[key], label=name, lw=1)
            ax.set_title(key.replace("_", " "))
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    written.append(os.path.join(out_dir, "training.png"))
    fig.savefig(written[-1], dpi=90)
    plt.close(fig)

    if study.get("continual"):
        table = study["continual"]["table"]
        keys = list(table)
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        x = range(len(keys))
        w = 0.27
        for off, metric, label in ((-w, "new_accuracy", "new (reassigned) facts"),
                                   (0, "old_accuracy", "old unchanged facts"),
                                   (w, "superseded_rate", "answers a superseded value")):
            axes[0].bar([i + off for i in x], [table[k][metric] for k in keys], w, label=label)
        for off, metric, label in ((-w, "new_logprob", "new facts"), (0, "old_logprob", "old unchanged"),
                                   (w, "superseded_logprob", "superseded value")):
            axes[1].bar([i + off for i in x], [table[k][metric] for k in keys], w, label=label)
        for ax, title in zip(axes, ("greedy accuracy after the stream", "log-prob of the value (nats)")):
            ax.set_xticks(list(x), [k.replace("|", "\n") for k in keys], fontsize=7)
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=7)
        axes[0].set_ylim(-0.05, 1.05)
        fig.tight_layout()
        written.append(os.path.join(out_dir, "continual.png"))
        fig.savefig(written[-1], dpi=90)
        plt.close(fig)
    return written


# ------------------------------------------------------------------------------------------------ main
def answer_kind_rate(examples: list[dict], length_name: str, tasks=TASKS) -> float:
    """Share of the examples at ``length_name`` whose first prediction has the kind of the answer (digits, or a word
    of the task's answer list): did the model keep the answer format, right value or not."""
    from hope_hf.evaluation.tasks import PLACES, WORDS, format_length

    def ok(e):
        p = e["predictions"][0] if e["predictions"] else ""
        if e["task"] in ("passkey", "number", "mqar"):
            return p.isdigit()
        return p in (PLACES if e["task"] == "babilong" else WORDS)

    sel = [e for e in examples if format_length(e["length"]) == length_name and e["task"] in tasks]
    return sum(ok(e) for e in sel) / len(sel) if sel else float("nan")


def report(study: dict) -> str:
    """Markdown tables of a study: accuracy by model x length (mean and per task), by depth, training, continual."""
    lines = []
    models = study["models"]
    lengths = list(next(iter(models.values()))["eval"]["mean_by_length"])
    lines += ["| model | parameters | train s | eval s | " + " | ".join(lengths) + " |",
              "|---|---|---|---|" + "---|" * len(lengths)]
    for name, m in models.items():
        lines.append(f"| {name} | {m['config']['parameters']:,} | {m['train']['train_seconds']:.0f} | "
                     f"{m['eval_seconds']:.0f} | "
                     + " | ".join(f"{m['eval']['mean_by_length'][L]:.3f}" for L in lengths) + " |")
    lines += ["", "Per task (accuracy; `-` = not run at that length):", "",
              "| model | task | " + " | ".join(lengths) + " |", "|---|---|" + "---|" * len(lengths)]
    for name, m in models.items():
        for task, row in m["eval"]["by_task_length"].items():
            lines.append(f"| {name} | {task} | " + " | ".join(f"{row[L]:.3f}" if L in row else "-" for L in lengths)
                         + " |")
    depths = sorted({d for m in models.values() for row in m["eval"]["mean_by_length_depth"].values() for d in row},
                    key=float)
    lines += ["", "By depth (mean over the tasks run at that length):", "",
              "| model | length | " + " | ".join(f"depth {d}" for d in depths) + " |",
              "|---|---|" + "---|" * len(depths)]
    for name, m in models.items():
        for L, row in m["eval"]["mean_by_length_depth"].items():
            lines.append(f"| {name} | {L} | " + " | ".join(f"{row[d]:.3f}" if d in row else "-" for d in depths) + " |")
    lines += ["", "Answers of the right kind, right or wrong (share of examples whose first answer is a digit string "
                  "for passkey / number / mqar, one of the task's answer words for word / babilong): passkey (run at "
                  "every length), and all the tasks run at that length:", "",
              "| model | tasks | " + " | ".join(lengths) + " |", "|---|---|" + "---|" * len(lengths)]
    for name, m in models.items():
        for label, tasks in (("passkey", ("passkey",)), ("all run", TASKS)):
            lines.append(f"| {name} | {label} | " + " | ".join(
                f"{answer_kind_rate(m['eval']['examples'], L, tasks):.2f}" for L in lengths) + " |")
    lines += ["", "Training (mean over the last 10 steps; teacher-forced answer-token accuracy):", "",
              "| model | lm loss first step | lm loss last 10 | answer loss first step | answer loss last 10 | "
              "answer-token acc last 10 |", "|---|---|---|---|---|---|"]
    for name, m in models.items():
        h = m["train"]

        def last(k):
            return sum(h[k][-10:]) / len(h[k][-10:])

        lines.append(f"| {name} | {h['lm_loss'][0]:.3f} | {last('lm_loss'):.3f} | {h['answer_loss'][0]:.3f} | "
                     f"{last('answer_loss'):.3f} | {last('answer_token_accuracy'):.3f} |")
    if study.get("continual"):
        c = study["continual"]
        lines += ["", f"Continual learning ({len(c['streams'])} streams of {c['stream_length']} tokens, "
                      f"{c['n_keys']} keys, {c['n_changed']} reassigned; mean over streams):", "",
                  "| model, stream-learning lr | middle: facts so far | end: new (reassigned) | end: old unchanged | "
                  "end: answers superseded value | log p new | log p old | log p superseded | loss 1st half | "
                  "loss 2nd half |", "|---|---|---|---|---|---|---|---|---|---|"]
        for key, r in c["table"].items():
            lines.append(f"| {key.replace('|', ', ')} | {r['middle_accuracy']:.2f} | {r['new_accuracy']:.2f} | "
                         f"{r['old_accuracy']:.2f} | "
                         f"{r['superseded_rate']:.2f} | {r['new_logprob']:.2f} | {r['old_logprob']:.2f} | "
                         f"{r['superseded_logprob']:.2f} | {r['mean_loss_first_half']:.3f} | "
                         f"{r['mean_loss_second_half']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.report_only:
        with open(os.path.join(args.output_dir, "study.json")) as f:
            study = json.load(f)
        if not args.no_plots:
            study["plots"] = plots(study, args.output_dir)
        with open(os.path.join(args.output_dir, "report.md"), "w") as f:
            f.write(report(study))
        print(report(study))
        return study
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    import transformers

    from hope_hf.data import load_documents
    from hope_hf.tokenizer import train_tokenizer

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    os.makedirs(args.output_dir, exist_ok=True)
    log = Log()
    t_start = time.time()
    study = {"settings": {k: v for k, v in vars(args).items()},
             "machine": {"platform": platform.platform(), "processor": platform.processor(),
                         "cpu_count": os.cpu_count(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "threads": torch.get_num_threads()},
             "models": {}, "timings": {}}

    t0 = time.time()
    tok = train_tokenizer(load_documents("stdlib", max_chars=100_000 if args.quick else 300_000),
                          vocab_size=args.vocab_size)
    configs = build_configs(tok)
    batches = training_batches(tok, args)
    study["timings"]["data_seconds"] = time.time() - t0
    study["training_data"] = {"steps": len(batches), "tokens": sum(int(b["ids"].numel()) for b in batches),
                              "non_pad_tokens": sum(int(b["valid"].sum()) for b in batches),
                              "answer_tokens": sum(int(b["answer"].sum()) for b in batches),
                              "lengths": [b["length"] for b in batches]}
    log(f"tokenizer ({len(tok)} tokens) and {len(batches)} training batches "
        f"({study['training_data']['tokens']:,} tokens) in {study['timings']['data_seconds']:.1f} s")

    models = {}
    for name in args.models:
        model = build_model(name, configs, args.seed)
        entry = {"config": describe(model)}
        log(f"{name}: {entry['config']['parameters']:,} parameters; training")
        entry["train"] = train(model, batches, args, log, name)
        log(f"{name}: trained in {entry['train']['train_seconds']:.0f} s (last lm loss "
            f"{entry['train']['lm_loss'][-1]:.3f}, answer loss {entry['train']['answer_loss'][-1]:.3f}); evaluating")
        t0 = time.time()
        entry["eval"] = evaluate(model, tok, args, log, name)
        entry["eval_seconds"] = time.time() - t0
        study["models"][name] = entry
        models[name] = model
        if args.save_models:
            model.save_pretrained(os.path.join(args.output_dir, "models", name))
            tok.save_pretrained(os.path.join(args.output_dir, "models", name))
        _write(study, args.output_dir)

    if not args.skip_continual:
        log("continual learning")
        t0 = time.time()
        study["continual"] = continual(models, tok, args, log)
        study["timings"]["continual_seconds"] = time.time() - t0
    study["timings"]["wall_seconds"] = time.time() - t_start
    if not args.no_plots:
        study["plots"] = plots(study, args.output_dir)
    _write(study, args.output_dir)
    with open(os.path.join(args.output_dir, "report.md"), "w") as f:
        f.write(report(study))
    log(f"done in {study['timings']['wall_seconds']:.0f} s; results in {os.path.join(args.output_dir, 'study.json')}")
    print_summary(study)
    return study


def _write(study, out_dir):
    path = os.path.join(out_dir, "study.json")
    with open(path + ".tmp", "w") as f:
        json.dump(study, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def print_summary(study) -> None:
    models = study["models"]
    lengths = list(next(iter(models.values()))["eval"]["mean_by_length"]) if models else []
    print("\nmean accuracy by length: " + " | ".join(f"{L:>6}" for L in lengths))
    for name, m in models.items():
        print(f"{name:>16} ({m['config']['parameters']:,} params): "
              + " | ".join(f"{m['eval']['mean_by_length'][L]:6.3f}" for L in lengths))
    if study.get("continual"):
        print("\ncontinual (mean over streams): new / old unchanged / superseded answered / middle")
        for key, row in study["continual"]["table"].items():
            print(f"{key:>24}: {row['new_accuracy']:.2f} / {row['old_accuracy']:.2f} / {row['superseded_rate']:.2f}"
                  f" / {row['middle_accuracy']:.2f}")


if __name__ == "__main__":
    main()
