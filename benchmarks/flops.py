"""FLOP/s of the self-modifying Titans layer against plain `torch.matmul` at the layer's own shapes.

The layer's FLOPs are counted, not estimated: `torch.utils.flop_counter.FlopCounterMode` records every matmul-like
op (mm, bmm, einsum, convolution) of one forward + backward with `recompute_memory_states=False`, i.e. the model
FLOPs without recomputation (elementwise ops and the small triangular solves are not counted, which flatters
nobody). The layer is then timed with its default settings (recomputation on) and with recomputation off, and its
achieved FLOP/s = counted FLOPs / time is compared with what `torch.matmul` reaches, in the same run, on the
batched shapes that dominate the chunk step (batch R*H; the chunk's tokens against a head's weights), and on one large
square matmul (the machine's practical peak).

    python benchmarks/flops.py                        # width 128 and 512 (the tiny and small presets' layers)
    python benchmarks/flops.py --widths 128x4 --compile-chunk-step   # the layer with its chunk step compiled
    python benchmarks/flops.py --quick                # seconds: what CI runs (asserts nothing about time)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _report import check_sizes, flop_counter, save_report


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_layer(hidden, heads, chunk_size, recompute, compiled=False):
    from hope_hf import HopeConfig
    from hope_hf.memory_hope import HopeSelfModifyingTitans

    cfg = HopeConfig(vocab_size=128, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads,
                     chunk_size=chunk_size, recompute_memory_states=recompute, compile_chunk_step=compiled)
    torch.manual_seed(0)
    layer = HopeSelfModifyingTitans(cfg, 0)
    layer.init_memory_weights()
    return layer


def count_flops(layer, x) -> int:
    with flop_counter() as counter:
        layer(x).sum().backward()
    layer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_flops_per_second(shapes, repeats) -> float:
    """Mean FLOP/s of torch.matmul over the given (batch, m, k, n) shapes."""
    rates = []
    for batch, m, k, n in shapes:
        a, b = torch.randn(batch, m, k), torch.randn(batch, k, n)
        inner = max(1, int(2e7 // (2 * batch * m * k * n)))  # enough calls per timing to be above timer noise

        def run():
            for _ in range(inner):
                torch.matmul(a, b)

        rates.append(inner * 2 * batch * m * k * n / timed(run, repeats))
    return statistics.mean(rates)


def measure(args):
    rows = []
    big = 512 if args.quick else 1024
    a = torch.randn(big, big)
    peak = 2 * big**3 / timed(lambda: torch.matmul(a, a), args.repeats)
    print(f"torch.matmul {big}x{big}x{big}: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'width':>5} {'heads':>5} {'length':>6} | {'GFLOP/token':>11} | {'layer GFLOP/s':>13} "
          f"{'(no recompute)':>14} | {'matmul@shapes':>13} {'ratio':>6} | {'vs big matmul':>13}")
    for hidden, heads in args.widths:
        d = hidden // heads
        for length in args.lengths:
            x = torch.randn(args.batch, length, hidden, requires_grad=True)
            flops = count_flops(build_layer(hidden, heads, args.chunk_size, False), x)
            times = {}
            for recompute in (True, False):
                layer = build_layer(hidden, heads, args.chunk_size, recompute, args.compile_chunk_step)

                def step():
                    layer(x).sum().backward()
                    layer.zero_grad(set_to_none=True)

                times[recompute] = timed(step, args.repeats)
            n_mem = layer.num_memories
            m, rows_heads, C = 2 * d, args.batch * heads, args.chunk_size
            shapes = [(rows_heads, C, d, n_mem * m), (rows_heads, 2 * C, d, n_mem * m), (rows_heads, d, C, n_mem * m),
                      (rows_heads * n_mem, C, m, d)]
            ref = matmul_flops_per_second(shapes, args.repeats)
            rate, rate_plain = flops / times[True], flops / times[False]
            row = {
                "hidden": hidden, "heads": heads, "length": length, "batch": args.batch, "chunk_size": C,
                "compile_chunk_step": args.compile_chunk_step,
                "flops_per_token": flops / (args.batch * length),
                "layer_flops_per_second": rate,
                "layer_flops_per_second_no_recompute": rate_plain,
                "matmul_flops_per_second_at_shapes": ref,
                "matmul_shapes": shapes,
                "big_matmul_flops_per_second": peak,
                "ratio_to_matmul_at_shapes": max(rate, rate_plain) / ref,
                "ratio_to_big_matmul": max(rate, rate_plain) / peak,
            }
            rows.append(row)
            print(f"{hidden:>5} {heads:>5} {length:>6} | {row['flops_per_token'] / 1e9:>11.5f} | {rate / 1e9:>13.2f} "
                  f"{rate_plain / 1e9:>14.2f} | {ref / 1e9:>13.2f} {row['ratio_to_matmul_at_shapes']:>5.0%} | "
                  f"{row['ratio_to_big_matmul']:>12.0%}")
    return {"big_matmul_flops_per_second": peak, "rows": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=lambda s: [tuple(int(v) for v in w.split("x")) for w in s.split(",")],
                        default=[(128, 4), (512, 8)], help="comma-separated WIDTHxHEADS (default: 128x4,512x8)")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[2048],
                        help="comma-separated sequence lengths (default: 2048)")
    parser.add_argument("--batch", type=int, default=4, help="sequences (default: 4)")
    parser.add_argument("--chunk-size", "--chunk_size", dest="chunk_size", type=int, default=16,
                        help="chunk size (default: 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions; the median is kept (default: 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--compile-chunk-step", action="store_true",
                        help="time the layer with compile_chunk_step=True (the warm-up step compiles; the FLOPs are "
                             "counted on the eager layer: the same math)")
    parser.add_argument("--quick", action="store_true", help="one small width and length, one repeat")
    parser.add_argument("--json", default="benchmarks/results/flops.json", help="where to write the results")
    args = parser.parse_args(argv)
    check_sizes(parser, args, positive=("widths", "lengths", "batch", "chunk_size", "repeats", "threads"))
    torch.set_num_threads(args.threads)
    if args.quick:
        args.widths, args.lengths, args.batch, args.repeats = [(32, 2)], [64], 1, 1
    return save_report(args, **measure(args))


if __name__ == "__main__":
    main()
