"""Decoding cost and cache size of HOPE against Llama with its KV cache, and a 1M-token stream through the cache.

For each preset (tiny, small) and context length it fills the cache with the context (streamed in pieces), then
times single-token decoding steps. The Llama baseline has the same hidden size, depth, heads and vocabulary, with
its MLP width chosen so that both models have the same parameter count. Everything is measured in one run; on a CPU
read the ratios, not the absolute numbers.

    python benchmarks/decode.py                       # tiny + small at 1K / 8K / 32K, then 1M tokens through tiny
    python benchmarks/decode.py --quick               # seconds: what CI runs (asserts nothing about time)
"""

from __future__ import annotations

import argparse
import inspect
import resource
import time

import torch
from _report import check_sizes, save_report


def llama_like(config):
    """A LlamaForCausalLM with HOPE's width, depth, heads and vocabulary and (about) the same parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hope_hf.presets import count_parameters

    target = count_parameters(config)
    D, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    fixed = V * D + L * (4 * D * D + 2 * D) + D  # embeddings (tied), attention, norms
    inter = max(8, round((target - fixed) / (3 * D * L)))
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=inter, num_hidden_layers=L,
                      num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_attention_heads,
                      max_position_embeddings=1 << 21, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def cache_bytes(cache):
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def cache_kwarg(model, cache):
    """Transformers 5.24 takes the cache as `cache=`, earlier 5.x as `past_key_values=`."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


@torch.no_grad()
def fill(model, cache, context, piece, vocab):
    ids = torch.randint(0, vocab, (1, context))
    for lo in range(0, context, piece):
        model(input_ids=ids[:, lo : lo + piece], use_cache=True, logits_to_keep=1, **cache_kwarg(model, cache))


@torch.no_grad()
def ms_per_token(model, cache, steps, vocab):
    tok = torch.randint(0, vocab, (1, 1))
    model(input_ids=tok, use_cache=True, **cache_kwarg(model, cache))  # warm-up step
    start = time.perf_counter()
    for _ in range(steps):
        model(input_ids=tok, use_cache=True, **cache_kwarg(model, cache))
    return 1000 * (time.perf_counter() - start) / steps


def decode_table(args):
    from transformers import DynamicCache

    from hope_hf import HopeForCausalLM
    from hope_hf.cache_hope import HopeCache
    from hope_hf.presets import get_preset

    rows = []
    for preset in args.presets:
        cfg = get_preset(preset)
        torch.manual_seed(0)
        hope = HopeForCausalLM(cfg).eval()
        llama = llama_like(cfg)
        n_hope = sum(p.numel() for p in hope.parameters())
        n_llama = sum(p.numel() for p in llama.parameters())
        for context in args.contexts:
            row = {"preset": preset, "context": context, "hope_params": n_hope, "llama_params": n_llama}
            for kind, model, cache in (("hope", hope, HopeCache(cfg)), ("llama", llama, DynamicCache())):
                fill(model, cache, context, args.piece, cfg.vocab_size)
                row[f"{kind}_ms_per_token"] = ms_per_token(model, cache, args.steps, cfg.vocab_size)
                row[f"{kind}_cache_bytes"] = cache_bytes(cache)
            row["speedup_vs_llama"] = row["llama_ms_per_token"] / row["hope_ms_per_token"]
            rows.append(row)
            print(
                f"{preset:>6} ctx {context:>6}: hope {row['hope_ms_per_token']:7.2f} ms/tok, cache "
                f"{row['hope_cache_bytes'] / 2**20:8.2f} MiB | llama {row['llama_ms_per_token']:7.2f} ms/tok, cache "
                f"{row['llama_cache_bytes'] / 2**20:8.2f} MiB | HOPE at {row['speedup_vs_llama']:.2f}x Llama's speed",
                flush=True,
            )
    return rows


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@torch.no_grad()
def stream_million(args):
    from hope_hf import HopeForCausalLM
    from hope_hf.presets import get_preset
    from hope_hf.streaming import stream_prefill

    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = HopeForCausalLM(cfg).eval()
    total, piece = args.stream_tokens, args.stream_piece
    gen = torch.Generator().manual_seed(0)
    pieces = (torch.randint(0, cfg.vocab_size, (1, min(piece, total - lo)), generator=gen)
              for lo in range(0, total, piece))
    rss_before = peak_rss_mib()
    start = time.perf_counter()
    cache, logits = stream_prefill(model, pieces, progress=not args.no_progress, total=total)
    wall = time.perf_counter() - start
    finite = bool(torch.isfinite(logits).all())
    result = {"tokens": total, "piece": piece, "wall_s": wall, "tokens_per_s": total / wall,
              "peak_rss_mib": peak_rss_mib(), "peak_rss_before_mib": rss_before, "cache_bytes": cache.nbytes(),
              "final_logits_finite": finite}
    print(f"streamed {total:,} tokens through tiny in {wall:.1f} s ({total / wall:,.0f} tok/s), peak RSS "
          f"{result['peak_rss_mib']:.0f} MiB, cache {cache.nbytes() / 2**10:.1f} KiB, logits finite: {finite}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], help="HOPE presets to measure")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768], help="context lengths")
    parser.add_argument("--steps", type=int, default=16, help="timed decoding steps per measurement")
    parser.add_argument("--piece", type=int, default=2048, help="tokens per piece while filling the cache")
    parser.add_argument("--stream-tokens", type=int, default=1_000_000, help="tokens streamed through tiny (0: skip)")
    parser.add_argument("--stream-piece", type=int, default=4096, help="tokens per piece of the stream")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default="benchmarks/results/decode.json", help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run for CI")
    args = parser.parse_args(argv)
    check_sizes(parser, args, positive=("contexts", "steps", "piece", "stream_piece", "threads"),
                nonnegative=("stream_tokens",))
    from hope_hf.presets import PRESETS

    unknown = [p for p in args.presets if p.lower() not in PRESETS]
    if unknown:
        parser.error(f"--presets: unknown {unknown}; choose from {', '.join(PRESETS)}")
    if args.quick:
        args.presets, args.contexts, args.steps, args.piece = ["tiny"], [64, 256], 2, 128
        args.stream_tokens, args.stream_piece, args.no_progress = 2048, 512, True
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"decode": decode_table(args)}
    if args.stream_tokens:
        results["stream"] = stream_million(args)
    return save_report(args, **results)


if __name__ == "__main__":
    main()
