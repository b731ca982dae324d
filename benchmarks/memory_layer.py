"""Throughput of the self-modifying Titans layer (forward, and forward + backward) against a Llama decoder layer.

For each chunk size and sequence length it prints tokens/s of the HOPE memory layer and, measured in the same run,
of a `LlamaDecoderLayer` (sdpa attention + SwiGLU MLP) of the same width, and the ratio between them. The last
column, microseconds per token, shows whether time grows linearly with length (it should stay flat).

    python benchmarks/memory_layer.py                 # chunk 1/16/64 x length 512/2048/8192
    python benchmarks/memory_layer.py --quick         # a few seconds: what CI runs (asserts nothing about time)
"""

from __future__ import annotations

import argparse
import time

import torch
from _report import check_sizes, save_report


def build_layers(hidden, heads, chunk_size, memory_expansion):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from hope_hf import HopeConfig
    from hope_hf.memory_hope import HopeSelfModifyingTitans

    cfg = HopeConfig(vocab_size=128, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads,
                     chunk_size=chunk_size, memory_expansion=memory_expansion)
    titans = HopeSelfModifyingTitans(cfg, 0)
    titans.init_memory_weights()
    llama_cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(8 / 3 * hidden), num_attention_heads=heads,
                            num_key_value_heads=heads, num_hidden_layers=1, vocab_size=128,
                            max_position_embeddings=1 << 20)
    llama_cfg._attn_implementation = "sdpa"
    llama = LlamaDecoderLayer(llama_cfg, 0)
    rope = LlamaRotaryEmbedding(llama_cfg)
    return titans, llama, rope


def timed(fn, repeats):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(args):
    rows = []
    torch.manual_seed(0)
    for chunk in args.chunk_sizes:
        titans, llama, rope = build_layers(args.hidden, args.heads, chunk, args.memory_expansion)
        for length in args.lengths:
            if chunk == 1 and length > args.max_len_chunk1:
                continue
            x = torch.randn(args.batch, length, args.hidden, requires_grad=True)
            pos = torch.arange(length)[None].expand(args.batch, -1)
            cos_sin = rope(x, pos)

            def hope_fwd():
                with torch.no_grad():
                    titans.forward_with_state(x)

            def hope_fwd_bwd():
                out, _ = titans.forward_with_state(x)
                out.sum().backward()

            def llama_fwd():
                with torch.no_grad():
                    llama(x, position_embeddings=cos_sin, attention_mask=None)

            def llama_fwd_bwd():
                out = llama(x, position_embeddings=cos_sin, attention_mask=None)
                out = out[0] if isinstance(out, tuple) else out
                out.sum().backward()

            tokens = args.batch * length
            row = {"chunk_size": chunk, "length": length, "batch": args.batch}
            for name, fn in [("hope_fwd", hope_fwd), ("hope_fwd_bwd", hope_fwd_bwd),
                             ("llama_fwd", llama_fwd), ("llama_fwd_bwd", llama_fwd_bwd)]:
                row[name + "_tok_s"] = tokens / timed(fn, args.repeats)
            row["fwd_bwd_ratio_vs_llama"] = row["hope_fwd_bwd_tok_s"] / row["llama_fwd_bwd_tok_s"]
            row["hope_fwd_bwd_us_per_token"] = 1e6 / row["hope_fwd_bwd_tok_s"]
            rows.append(row)
            print(
                f"C={chunk:>3} T={length:>5}  hope fwd {row['hope_fwd_tok_s']:>9.0f} tok/s  fwd+bwd "
                f"{row['hope_fwd_bwd_tok_s']:>9.0f} tok/s ({row['hope_fwd_bwd_us_per_token']:7.1f} us/tok) | llama fwd "
                f"{row['llama_fwd_tok_s']:>9.0f}  fwd+bwd {row['llama_fwd_bwd_tok_s']:>9.0f} | "
                f"ratio {row['fwd_bwd_ratio_vs_llama']:.2f}x",
                flush=True,
            )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[1, 16, 64], help="chunk sizes to measure")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192], help="sequence lengths")
    parser.add_argument("--batch", type=int, default=2, help="batch size")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (heads x head size)")
    parser.add_argument("--heads", type=int, default=4, help="number of heads")
    parser.add_argument("--memory-expansion", type=int, default=2, help="memory hidden width / head size")
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions (the best is kept)")
    parser.add_argument("--max-len-chunk1", type=int, default=2048,
                        help="longest length measured at chunk size 1 (token-by-token is slow)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default="benchmarks/results/memory_layer.json", help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke run for CI")
    args = parser.parse_args(argv)
    check_sizes(parser, args, positive=("chunk_sizes", "lengths", "batch", "hidden", "heads", "memory_expansion",
                                        "repeats", "threads"), nonnegative=("max_len_chunk1",))
    if args.quick:
        args.chunk_sizes, args.lengths, args.batch, args.hidden, args.repeats = [1, 16], [64, 128], 1, 64, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(args)
    return save_report(args, rows=rows)


if __name__ == "__main__":
    main()
