"""Language modelling: HOPE, Hope-Attention and a Llama of equal parameters, trained identically.

Every model is trained on the same packed sequences of the embedded corpus (the Python standard library's source,
nothing downloaded) with the same tokenizer, order, steps and optimizer (AdamW, warm-up then cosine, clipping 1.0),
then scored on the same held-out files: perplexity, and the loss by position in the context (does a model use the
later part of its context better?). The script prints a table and writes JSON.

    python benchmarks/language_modeling.py                 # the tiny preset, 400 steps of 8 x 256 tokens
    python benchmarks/language_modeling.py --quick         # seconds: a smoke run (CI)

Models: `hope` (the tiny preset, all-Titans, default settings), `hope_attention` (the same with every mixer full
attention), `llama` (LlamaForCausalLM of the same width, depth and heads, its MLP sized to HOPE's parameter count).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from _report import check_sizes, save_report

MODELS = ("hope", "hope_attention", "llama")


def build_data(args):
    """(tokenizer, train ids (N, T), eval ids (M, T)) from the embedded corpus: a byte-level BPE tokenizer trained on
    the training documents, every `eval_every`-th document held out."""
    from hope_hf.data import load_documents, pack_dataset, split_documents
    from hope_hf.tokenizer import train_tokenizer

    docs = load_documents(max_chars=args.max_corpus_chars)
    train_docs, eval_docs = split_documents(docs, args.eval_every)
    tokenizer = train_tokenizer(train_docs, args.vocab_size)
    train = torch.tensor(pack_dataset(train_docs, tokenizer, args.seq_len)["input_ids"])
    held_out = torch.tensor(pack_dataset(eval_docs, tokenizer, args.seq_len)["input_ids"])
    return tokenizer, train, held_out[: args.eval_sequences]


def build_model(name: str, vocab_size: int, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hope_hf import HopeForCausalLM
    from hope_hf.presets import count_parameters, get_preset

    torch.manual_seed(args.seed)
    hope = get_preset(args.preset, vocab_size=vocab_size)
    if name == "hope":
        return HopeForCausalLM(hope)
    if name == "hope_attention":
        return HopeForCausalLM(get_preset(args.preset, vocab_size=vocab_size,
                                          layer_types=["full_attention"] * hope.num_hidden_layers))
    D, L = hope.hidden_size, hope.num_hidden_layers
    fixed = vocab_size * D + L * (4 * D * D + 2 * D) + D  # tied embeddings, attention, norms
    inter = max(8, round((count_parameters(hope) - fixed) / (3 * D * L)))
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=D, intermediate_size=inter, num_hidden_layers=L,
                      num_attention_heads=hope.num_attention_heads, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def learning_rate(step: int, total: int, peak: float) -> float:
    warmup = max(1, total // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def train(model, data, args) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    order = torch.Generator().manual_seed(args.seed + 1)
    losses, perm, model = [], torch.randperm(data.shape[0], generator=order), model.train()
    per_epoch = data.shape[0] // args.batch_size
    for step in range(args.steps):
        if step and step % per_epoch == 0:
            perm = torch.randperm(data.shape[0], generator=order)
        batch = data[perm[(step % per_epoch) * args.batch_size : (step % per_epoch + 1) * args.batch_size]]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if args.log_every and (step + 1) % args.log_every == 0:
            print(f"  step {step + 1}: loss {losses[-1]:.3f}", flush=True)
    return losses


@torch.no_grad()
def score(model, held_out, batch_size: int) -> torch.Tensor:
    """Mean next-token loss at every position of the held-out sequences (T - 1,)."""
    model.eval()
    total = torch.zeros(held_out.shape[1] - 1, dtype=torch.float64)
    for lo in range(0, held_out.shape[0], batch_size):
        ids = held_out[lo : lo + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        total += nll.sum(0).double()
    return total / held_out.shape[0]


def by_position(losses: torch.Tensor, buckets: int) -> list[dict]:
    """The loss by position, averaged over `buckets` equal spans of the context."""
    edges = torch.linspace(0, losses.numel(), buckets + 1).round().long().tolist()
    return [{"positions": [lo + 1, hi], "loss": float(losses[lo:hi].mean())} for lo, hi in zip(edges, edges[1:])]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--preset", default="tiny", help="HOPE preset the models are sized after")
    parser.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary (>= 258)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-corpus-chars", type=int, default=1_500_000, help="characters of the corpus read")
    parser.add_argument("--eval-every", type=int, default=20, help="every n-th document is held out")
    parser.add_argument("--eval-sequences", type=int, default=64, help="held-out sequences scored")
    parser.add_argument("--buckets", type=int, default=8, help="spans of the context for the loss by position")
    parser.add_argument("--log-every", type=int, default=50, help="print the training loss every n steps (0: never)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="benchmarks/results/language_modeling.json")
    parser.add_argument("--quick", action="store_true", help="a few steps on a small corpus: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seq_len, args.batch_size, args.max_corpus_chars = 3, 64, 2, 60_000
        args.vocab_size, args.eval_sequences, args.buckets, args.log_every = 300, 4, 2, 0
    check_sizes(parser, args, positive=("steps", "seq_len", "batch_size", "max_corpus_chars", "eval_every",
                                        "eval_sequences", "buckets", "threads"), nonnegative=("log_every",))
    if args.eval_every < 2:
        parser.error(f"--eval-every must be >= 2 (every n-th document is held out), got {args.eval_every}")
    if args.vocab_size < 258:
        parser.error(f"--vocab-size must be >= 258 (256 bytes + 2 special tokens), got {args.vocab_size}")
    if args.seq_len < 2 or args.buckets > args.seq_len - 1:
        parser.error(f"--buckets ({args.buckets}) must be at most --seq-len - 1 ({args.seq_len - 1})")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    from hope_hf.presets import available_presets

    if args.preset not in available_presets():
        parser.error(f"--preset must be one of {available_presets()}, got {args.preset!r}")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer, data, held_out = build_data(args)
    if data.shape[0] < args.batch_size or held_out.shape[0] == 0:
        raise SystemExit(f"language_modeling.py: the corpus gives {data.shape[0]} training and {held_out.shape[0]} "
                         "held-out sequences; read more of it (--max-corpus-chars) or use shorter ones (--seq-len)")
    print(f"{data.shape[0]} training and {held_out.shape[0]} held-out sequences of {args.seq_len} tokens, "
          f"vocabulary {len(tokenizer)}", flush=True)
    results = []
    for name in args.models:
        model = build_model(name, len(tokenizer), args)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {params:,} parameters", flush=True)
        start = time.perf_counter()
        losses = train(model, data, args)
        seconds = time.perf_counter() - start
        per_position = score(model, held_out, args.batch_size)
        results.append({"model": name, "parameters": params, "train_seconds": seconds, "train_losses": losses,
                        "eval_loss": float(per_position.mean()), "eval_perplexity": math.exp(per_position.mean()),
                        "loss_by_position": by_position(per_position, args.buckets)})
    print(f"\n{'model':<16} {'params':>10} {'eval ppl':>9} {'train s':>8}  loss by position (" +
          ", ".join(f"{b['positions'][0]}-{b['positions'][1]}" for b in results[0]["loss_by_position"]) + ")")
    for r in results:
        print(f"{r['model']:<16} {r['parameters']:>10,} {r['eval_perplexity']:>9.2f} {r['train_seconds']:>8.0f}  " +
              " ".join(f"{b['loss']:.3f}" for b in r["loss_by_position"]))
    save_report(args, sequences={"train": data.shape[0], "eval": held_out.shape[0]}, results=results)
    return results


if __name__ == "__main__":
    main()
