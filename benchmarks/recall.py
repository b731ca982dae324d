"""In-context recall: multi-query associative recall (MQAR, as in Zoology, Arora et al. 2023).

Each sequence holds `pairs` key-value pairs (keys from the lower half of the vocabulary, values from the upper
half), then the keys again at positions drawn from a power law, each followed by its value, and random tokens
everywhere else. Loss and accuracy are measured on the values that follow a queried key only: a model that knows
which values appeared but not which key they went with scores 1 / pairs, chance is 2 / vocab.

Every model trains on the same batches in the same order (AdamW, warm-up then cosine, clipping) and is evaluated
on the same held-out sequences. The script prints a table of test accuracy per model and grid point and writes JSON
with the learning curves.

    python benchmarks/recall.py                                   # the full grid (hours on a CPU)
    python benchmarks/recall.py --grid 64:4 --widths 64           # one grid point, every model
    python benchmarks/recall.py --models hope --variant 'chunk4={"chunk_size": 4}' --grid 64:4 --widths 64
    python benchmarks/recall.py --quick                           # seconds: a smoke run (CI)

Models: `llama` (LlamaForCausalLM of about HOPE's parameter count), `hope_attention` (every mixer full attention,
the same CMS), `hope` (all-Titans, default settings: self-modifying, linear memories), `hope_static`
(`self_modifying=False`), `hope_mlp` (`memory_depth=2`: the paper's residual MLP memories). `--variant NAME=JSON`
adds an all-Titans HOPE with the given config fields changed.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from _report import check_sizes, save_report

MODELS = ("llama", "hope_attention", "hope", "hope_static", "hope_mlp")
MODEL_OVERRIDES = {
    "hope": {},
    "hope_static": {"self_modifying": False},
    "hope_mlp": {"memory_depth": 2},
}


# ---------------------------------------------------------------------------------------------------- data
def make_mqar(num_examples: int, vocab_size: int, length: int, pairs: int, seed: int, power_a: float = 0.01,
              show_answers: bool = False):
    """MQAR sequences: (input_ids, targets), both (N, length) long; targets are -100 except where the next token is
    the value of a queried key (the position of the key itself, so `logits[:, t]` predicts `targets[:, t]`).

    Layout (Zoology's): k1 v1 k2 v2 ... kP vP, then the P keys again in a random order at distinct even offsets of
    the remaining span, their slots drawn from a power law (p(slot) ~ slot^(power_a - 1)); the token after a queried
    key is random like every other position (the answer is never shown) unless `show_answers`, where it is the
    key's value as in Zoology's own generator; values are distinct within a sequence."""
    if length < 4 * pairs:
        raise ValueError(f"length {length} is too short for {pairs} pairs: it needs at least 4 * pairs tokens")
    half = vocab_size // 2
    if half < pairs:
        raise ValueError(f"vocab_size {vocab_size} holds fewer than {pairs} distinct keys in its lower half")
    gen = torch.Generator().manual_seed(seed)
    keys = torch.argsort(torch.rand(num_examples, half, generator=gen), dim=1)[:, :pairs]
    values = half + torch.argsort(torch.rand(num_examples, vocab_size - half, generator=gen), dim=1)[:, :pairs]
    ids = torch.randint(0, vocab_size, (num_examples, length), generator=gen)
    targets = torch.full((num_examples, length), -100, dtype=torch.long)
    context = 2 * pairs
    ids[:, 0:context:2], ids[:, 1:context:2] = keys, values
    # query slots: the span after the context holds (length - context) // 2 two-token slots
    slots = (length - context) // 2
    gaps = torch.arange(1, slots + 1, dtype=torch.float64)
    weights = (power_a * gaps.pow(power_a - 1)).expand(num_examples, -1)
    chosen = torch.multinomial(weights, pairs, replacement=False, generator=gen)  # (N, pairs) slot indices
    order = torch.argsort(torch.rand(num_examples, pairs, generator=gen), dim=1)
    rows = torch.arange(num_examples).unsqueeze(1)
    pos = context + 2 * chosen
    ids[rows, pos] = keys.gather(1, order)
    targets[rows, pos] = values.gather(1, order)
    if show_answers:
        ids[rows, pos + 1] = values.gather(1, order)
    return ids, targets


# ---------------------------------------------------------------------------------------------------- models
def hope_config(name: str, vocab_size: int, width: int, layers: int, heads: int, overrides: dict):
    from hope_hf import HopeConfig

    kwargs = dict(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                  max_position_embeddings=4096)
    if name == "hope_attention":
        kwargs["layer_types"] = ["full_attention"] * layers
    else:
        kwargs.update(MODEL_OVERRIDES.get(name, {}))
    kwargs.update(overrides)
    return HopeConfig(**kwargs)


def llama_config(vocab_size: int, width: int, layers: int, heads: int, target_parameters: int):
    """A LlamaConfig of the given shape whose MLP width brings it to about `target_parameters`."""
    from transformers import LlamaConfig

    fixed = vocab_size * width + layers * (4 * width * width + 2 * width) + width  # tied embeddings, attention, norms
    inter = max(8, round((target_parameters - fixed) / (3 * width * layers)))
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_model(name: str, args, width: int, overrides: dict, seed: int):
    from transformers import LlamaForCausalLM

    from hope_hf import HopeForCausalLM
    from hope_hf.presets import count_parameters

    torch.manual_seed(seed)
    if name == "llama":
        target = count_parameters(hope_config("hope", args.vocab_size, width, args.layers, args.heads, {}))
        return LlamaForCausalLM(llama_config(args.vocab_size, width, args.layers, args.heads, target))
    return HopeForCausalLM(hope_config(name, args.vocab_size, width, args.layers, args.heads, overrides))


# ---------------------------------------------------------------------------------------------------- training
def learning_rate(step: int, total: int, peak: float, warmup_fraction: float = 0.1, floor: float = 0.1) -> float:
    """Linear warm-up over the first 10% of the steps, then cosine down to 10% of the peak."""
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def answer_loss(model, ids, targets):
    """Mean cross-entropy and number of correct top-1 answers over the positions that have a target."""
    logits = model(input_ids=ids, use_cache=False).logits
    mask = targets != -100
    picked = logits[mask]
    loss = F.cross_entropy(picked.float(), targets[mask])
    correct = (picked.argmax(-1) == targets[mask]).sum()
    return loss, int(correct), int(mask.sum())


@torch.no_grad()
def evaluate(model, ids, targets, batch_size: int) -> tuple[float, float]:
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for lo in range(0, ids.shape[0], batch_size):
        loss, c, n = answer_loss(model, ids[lo : lo + batch_size], targets[lo : lo + batch_size])
        loss_sum += float(loss.detach()) * n
        correct, total = correct + c, total + n
    model.train()
    return loss_sum / total, correct / total


def train_one(model, train, test, args, progress=None) -> dict:
    """Train `model` on `train` for `args.steps` steps and evaluate it on `test` every `args.eval_every` steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    order = torch.Generator().manual_seed(args.seed + 1)
    ids, targets = train
    per_epoch = ids.shape[0] // args.batch_size
    perm = torch.randperm(ids.shape[0], generator=order)
    curve, start = [], time.perf_counter()
    model.train()
    for step in range(args.steps):
        if step and step % per_epoch == 0:
            perm = torch.randperm(ids.shape[0], generator=order)
        idx = perm[(step % per_epoch) * args.batch_size : (step % per_epoch + 1) * args.batch_size]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        loss, _, _ = answer_loss(model, ids[idx], targets[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        done = step + 1
        if done % args.eval_every == 0 or done == args.steps:
            test_loss, test_acc = evaluate(model, *test, args.batch_size)
            curve.append({"step": done, "train_loss": float(loss.detach()), "test_loss": test_loss,
                          "test_accuracy": test_acc, "seconds": time.perf_counter() - start})
            if progress is not None:
                progress(curve[-1])
            if not math.isfinite(test_loss):
                break
    return {"curve": curve, "test_accuracy": curve[-1]["test_accuracy"], "test_loss": curve[-1]["test_loss"],
            "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------------- CLI
def _grid_point(text: str) -> tuple[int, int]:
    try:
        length, pairs = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a grid point is LENGTH:PAIRS (e.g. 64:4), got {text!r}") from None
    return length, pairs


def _variant(text: str) -> tuple[str, dict]:
    name, sep, spec = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"a variant is NAME=JSON (e.g. 'chunk4={{\"chunk_size\": 4}}'), got {text!r}")
    try:
        overrides = json.loads(spec)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"variant {name!r}: not JSON ({err})") from None
    if not isinstance(overrides, dict):
        raise argparse.ArgumentTypeError(f"variant {name!r}: the JSON must be an object of config fields")
    return name, overrides


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--models", nargs="*", choices=MODELS, default=list(MODELS),
                        help="models to train (none: only the --variant models)")
    parser.add_argument("--variant", type=_variant, action="append", default=[], metavar="NAME=JSON",
                        help="an extra all-Titans HOPE with these config fields changed (repeatable)")
    parser.add_argument("--grid", type=_grid_point, nargs="+", default=[(64, 4), (128, 8), (256, 16)],
                        metavar="LENGTH:PAIRS", help="sequence lengths and key-value pairs")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128], help="hidden sizes")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train-examples", type=int, default=20000)
    parser.add_argument("--test-examples", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--show-answers", action="store_true",
                        help="put each queried key's value after it in the input, as Zoology's own generator does "
                             "(default: a random token there, so the answer is never shown)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the documented runs)")
    parser.add_argument("--json", default="benchmarks/results/recall.json", help="where to write results ('' for none)")
    parser.add_argument("--quick", action="store_true", help="a few steps at one small grid point: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.grid, args.widths, args.steps, args.eval_every = [(32, 2)], [32], 4, 2
        args.train_examples, args.test_examples, args.batch_size = 64, 32, 16
    check_sizes(parser, args, positive=("grid", "widths", "layers", "heads", "vocab_size", "steps", "batch_size",
                                        "train_examples", "test_examples", "eval_every", "threads"))
    if args.train_examples < args.batch_size:
        parser.error(f"--train-examples ({args.train_examples}) must be at least --batch-size ({args.batch_size})")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if not args.models and not args.variant:
        parser.error("nothing to train: give --models or at least one --variant")
    names = [name for name, _ in args.variant]
    clash = sorted({n for n in names if names.count(n) > 1 or n in MODELS})
    if clash:
        parser.error(f"--variant names must be unique and differ from the models {MODELS}: {clash}")
    for width in args.widths:
        if width % args.heads:
            parser.error(f"--widths: {width} is not divisible by --heads {args.heads}")
    for length, pairs in args.grid:
        if length < 4 * pairs:
            parser.error(f"--grid {length}:{pairs}: the length must be at least 4 x pairs")
        if args.vocab_size // 2 < pairs:
            parser.error(f"--grid {length}:{pairs}: --vocab-size {args.vocab_size} has too few keys")
    from hope_hf.presets import check_config_fields

    try:  # every model's config is valid before anything trains
        for _, overrides in args.variant:
            check_config_fields(overrides)
        for width in args.widths:
            for name, overrides in [(m, {}) for m in args.models if m != "llama"] + args.variant:
                hope_config(name if name in MODELS else "hope", args.vocab_size, width, args.layers, args.heads,
                            overrides)
    except (ValueError, TypeError) as err:
        parser.error(f"invalid model config: {err}")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    entries = [(m, m, {}) for m in args.models] + [(name, "hope", ov) for name, ov in args.variant]
    results = []
    header = f"{'model':<22} {'width':>5} {'length':>6} {'pairs':>5} {'params':>9} {'accuracy':>8} {'loss':>7} {'s':>7}"
    for length, pairs in args.grid:
        train = make_mqar(args.train_examples, args.vocab_size, length, pairs, seed=args.seed,
                          show_answers=args.show_answers)
        test = make_mqar(args.test_examples, args.vocab_size, length, pairs, seed=args.seed + 10_000,
                         show_answers=args.show_answers)
        for width in args.widths:
            for label, kind, overrides in entries:
                model = build_model(kind, args, width, overrides, seed=args.seed)
                params = sum(p.numel() for p in model.parameters())
                tag = f"{label} w{width} {length}:{pairs}"
                out = train_one(model, train, test, args, progress=lambda r, tag=tag: print(
                    f"  {tag} step {r['step']}: loss {r['train_loss']:.3f} test acc {r['test_accuracy']:.3f} "
                    f"({r['seconds']:.0f} s)", flush=True))
                results.append({"model": label, "overrides": overrides, "width": width, "length": length,
                                "pairs": pairs, "parameters": params, **out})
                print(header)
                for r in results:
                    print(f"{r['model']:<22} {r['width']:>5} {r['length']:>6} {r['pairs']:>5} {r['parameters']:>9} "
                          f"{r['test_accuracy']:>8.3f} {r['test_loss']:>7.3f} {r['seconds']:>7.0f}", flush=True)
                save_report(args, results=results)  # after every model: a long run stopped early keeps its results
    return results


if __name__ == "__main__":
    main()
