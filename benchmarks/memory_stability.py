"""Stability of the self-modifying memories over a very long stream (default: 1M tokens).

What it checks and why: docs/design.md §6a, "Stability on long streams".

The tiny preset with every learning rate saturated at eta_max (the config's default unless --eta-max) reads three
token streams at once, one per batch row: i.i.d. tokens, a cycle of 37 tokens, and one constant token. The stream
goes through the recurrent cache in pieces; at every power of two it prints whether everything is finite, the size
of every memory's fast weights and how far they moved from the meta-learned initial state (min and max over layers,
heads, memories and rows). Sizes: for MLP memories the norm of each layer's weights relative to its initial value
(W2, W1); for linear memories the norm of the map W = I + B relative to the identity's, sqrt(d). A healthy memory
stays finite, bounded (well below 2) and alive (it keeps moving).

    python benchmarks/memory_stability.py                    # 1M tokens
    python benchmarks/memory_stability.py --tokens 65536     # what the test suite checks, for one layer
    python benchmarks/memory_stability.py --tokens 65536 --eta-max 0.1 --overrides '{"dgd": false}'   # an ablation
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _report import check_sizes, save_report


@torch.no_grad()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1 << 20, help="stream length per row")
    parser.add_argument("--piece", type=int, default=4096, help="tokens fed per forward")
    parser.add_argument("--eta-max", type=float, default=None,
                        help="eta_max (default: the config's); every learning rate is saturated at it")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--json", default="benchmarks/results/memory_stability.json", help="where to write results")
    parser.add_argument("--overrides", default="{}",
                        help='JSON of other config fields for the tiny preset, e.g. \'{"dgd": false}\' or '
                             '\'{"retention": false}\' (the ablations of docs/design.md §6a)')
    parser.add_argument("--quick", action="store_true", help="4096 tokens: a smoke run")
    args = parser.parse_args(argv)
    try:
        overrides = json.loads(args.overrides)
    except json.JSONDecodeError as err:
        parser.error(f"--overrides is not JSON: {err}")
    if not isinstance(overrides, dict) or "eta_max" in overrides:
        parser.error("--overrides must be a JSON object of config fields other than eta_max (use --eta-max)")
    check_sizes(parser, args, positive=("tokens", "piece", "threads"))
    if args.eta_max is not None and not 0 < args.eta_max <= 16:
        parser.error(f"--eta-max must be in (0, 16], got {args.eta_max}")
    if args.quick:
        args.tokens, args.piece = 4096, 1024
    if args.threads:
        torch.set_num_threads(args.threads)

    from hope_hf import HopeForCausalLM
    from hope_hf.cache_hope import HopeCache
    from hope_hf.presets import get_preset

    try:
        cfg = get_preset("tiny", **overrides, **({} if args.eta_max is None else {"eta_max": args.eta_max}))
    except ValueError as err:
        parser.error(f"--overrides: {err}")
    torch.manual_seed(0)
    model = HopeForCausalLM(cfg).eval()
    layers = [layer.titans for layer in model.model.layers if hasattr(layer, "titans")]
    for titans in layers:
        titans.fast_init.eta_bias.fill_(30.0)  # sigmoid(30) = 1: every step at eta_max
    names = ["iid", "cyclic", "constant"]
    gen = torch.Generator().manual_seed(1)
    cache = HopeCache(cfg)
    rows, next_report, start = [], 1024, time.perf_counter()
    for lo in range(0, args.tokens, args.piece):
        n = min(args.piece, args.tokens - lo)
        pos = torch.arange(lo, lo + n)
        ids = torch.stack([torch.randint(0, cfg.vocab_size, (n,), generator=gen), pos % 37,
                           torch.zeros(n, dtype=torch.long)])
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        seen = lo + n
        if seen >= next_report or seen == args.tokens:
            while next_report <= seen:
                next_report *= 2
            row = {"tokens": seen, "seconds": time.perf_counter() - start,
                   "logits_finite": bool(torch.isfinite(out.logits).all())}
            layers = [(idx, layer.titans) for idx, layer in enumerate(model.model.layers) if hasattr(layer, "titans")]
            parts = [f"{seen:>8} tok {row['seconds']:7.1f}s"]
            finite = row["logits_finite"]
            for key, label in weight_blocks(cfg):
                sizes, moved = torch.stack([torch.stack(weight_size(titans, cache.layers[idx].state, key))
                                            for idx, titans in layers]).unbind(1)  # each (layers, rows, ...)
                finite = finite and bool(torch.isfinite(sizes).all())
                for r, name in enumerate(names):
                    row[f"{name}_{key}_size_min"] = sizes[:, r].min().item()
                    row[f"{name}_{key}_size_max"] = sizes[:, r].max().item()
                    row[f"{name}_{key}_moved"] = moved[:, r].mean().item()
                parts += [f"{name} {label} {row[f'{name}_{key}_size_min']:.2f}-{row[f'{name}_{key}_size_max']:.2f} "
                          f"moved {row[f'{name}_{key}_moved']:.2f}" for name in names]
            row["finite"] = finite
            rows.append(row)
            parts.insert(1, f"finite={finite}")
            print(" | ".join(parts), flush=True)
    return save_report(args, rows=rows)


def weight_blocks(cfg):
    """(key, label) of the weights measured: W2 and W1 of MLP memories, the map W of linear ones."""
    return [("w_in", "|W2|/|W2_0|"), ("w_out", "|W1|/|W1_0|")] if cfg.memory_depth == 2 else [("w", "|W|/|I|")]


def weight_size(titans, state, key):
    """(size, moved) per row, head and memory of one layer's fast weights `key` (see `weight_blocks`)."""
    init = titans.fast_init
    if key == "w":  # linear memories: W = I + B, sized against the identity
        d = init.init_out.shape[-1]
        eye = torch.eye(d, dtype=state.current_out.dtype)
        return ((eye + state.current_out).norm(dim=(-2, -1)) / d**0.5,
                (state.current_out - init.init_out).norm(dim=(-2, -1)) / d**0.5)
    cur, ref = (state.current_in, init.init_in) if key == "w_in" else (state.current_out, init.init_out)
    if key == "w_in":  # (rows, heads, d, n*m) -> per memory
        n = init.init_out.shape[1]
        cur, ref = cur.unflatten(-1, (n, -1)).movedim(-2, -3), ref.unflatten(-1, (n, -1)).movedim(-2, -3)
    norm = ref.norm(dim=(-2, -1))
    return cur.norm(dim=(-2, -1)) / norm, (cur - ref).norm(dim=(-2, -1)) / norm


if __name__ == "__main__":
    main()
