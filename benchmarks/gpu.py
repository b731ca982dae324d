"""GPU checks and timings in one run: what a lent GPU machine is asked, in order of importance, within a time budget.

Sections (each writes its results into the JSON report as soon as it finishes, so a run cut short keeps them):
  env          versions, the card, and the matmul rates that are the ceilings (bf16, and float32 without TF32,
               which is what the memory's fast weights run in);
  correctness  a small Titans-only and a hybrid (Titans + full attention) model on the device against the same
               model on the CPU in float64: logits, a float64 loss and every parameter's gradient, in float64 and
               float32, with left padding; greedy generation with the recurrent cache against generation without
               it; a bf16-autocast step;
  cuda_graphs  HOPE training steps with the memory scan replayed from CUDA graphs (`memory_cuda_graphs`), with
               and without the compiled chunk step (`compile_chunk_step`), recomputation on and off, against the
               eager scan and Llama at 2048 tokens (and tiny at 8192); the step that captures is timed apart;
               model FLOP utilisation as in the training section;
  training     training steps (forward, loss, backward; bf16 autocast as `Trainer(bf16=True)` runs them) of HOPE
               and of the Llama of the same parameter count (`decode.llama_like`, sdpa): tokens/s, peak device
               memory, and model FLOP utilisation (matmul FLOPs counted with `FlopCounterMode`, without
               recomputation, over the measured bf16 matmul rate);
  evaluation   evaluation forward passes (eval mode, no gradients) of Llama and of HOPE with the eager scan and
               replayed from CUDA graphs (`memory_cuda_graphs`), at the cuda_graphs section's presets and lengths;
  profile      one HOPE training step under the profiler (--profile-variant: eager, or replayed from graphs and
               compiled, ...): time the device spends in kernels against wall time, and the number of kernels
               (how far the step is from bound by the host's kernel launches);
  compiled     HOPE training with the chunk step compiled by `torch.compile` (inductor, `compile_chunk_step`),
               against eager in the same run: compile time, step time, and the loss of both;
  decode       ms/token of HOPE (recurrent cache) and Llama (KV cache) after 1K and 32K tokens of context; with
               --baseline-memory also HOPE with another version's Titans layer, with --compile-decode also
               `torch.compile(model)`, with --decode-graphs also `memory_cuda_graphs` (one-token steps replayed from
               CUDA graphs), each at the shortest context, their logits compared with eager HOPE's;
  chunk_sizes  HOPE training steps at chunk sizes 16, 32, 64 (a model hyperparameter; the paper's is 16);
  recompute    HOPE training steps with `recompute_memory_states` on and off (speed against peak memory);
  long         training at 8192 tokens;
  compile_model  `torch.compile` of the whole model: a short training step against eager, with and without
               recomputation.

    python benchmarks/gpu.py                              # on a CUDA machine: all sections within --budget-s
    python benchmarks/gpu.py --quick --device cpu         # seconds: what CI runs (asserts nothing about time)
    python benchmarks/gpu.py --sections env,decode --baseline-memory old_memory_hope.py --compile-decode
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import time
import traceback

import torch
from _report import check_sizes, flop_counter, save_report


class Clock:
    """Seconds left of the run's budget."""

    def __init__(self, budget_s: float):
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step, device, max_steps=3, max_seconds=20.0):
    """Run `step` until `max_steps` timed runs or `max_seconds` spent (at least one); the median in seconds."""
    times = []
    while len(times) < max_steps and (not times or sum(times) < max_seconds):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def allow_recompiles(limit: int = 64):
    """Every distinct grad mode, stride pattern or piece length is a recompilation: allow them all rather than let
    Dynamo fall back to eager after its default 8 (the setting's name changed in torch 2.6)."""
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))


def rel_err(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------------------ env
def section_env(args, device):
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(device),
           "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=props.name, multiprocessors=props.multi_processor_count,
                   memory_gib=props.total_memory / 2**30)
    n = 256 if args.quick else 8192 if device.type == "cuda" else 1024
    for dtype in (torch.bfloat16, torch.float32):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        torch.matmul(a, b)
        sec, _ = timed_steps(lambda: [torch.matmul(a, b) for _ in range(10)], device, max_steps=3)
        out[f"matmul_{str(dtype).split('.')[-1]}_tflops"] = 10 * 2 * n**3 / sec / 1e12
    print(f"env: {out}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------- correctness
def section_correctness(args, device):
    """Each model on the device against itself on the CPU in float64. The loss is taken in float64 from the logits
    (Transformers' loss casts logits to float32). The Titans-only model must agree to float64 rounding; the hybrid
    one only to float32's, since rotary embeddings are computed in float32 on both devices (as in Llama)."""
    from hope_hf import HopeConfig, HopeForCausalLM

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 77), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in row 1
    labels = ids.masked_fill(mask == 0, -100)
    valid = mask.bool()

    def run(model, dev):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].double().flatten(0, 1), labels[:, 1:].to(dev).flatten())
        loss.backward()
        return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    out = {}
    for name, layer_types in (("titans", ["linear_attention"] * 2),
                              ("hybrid", ["linear_attention", "full_attention", "linear_attention"])):
        cfg = HopeConfig(vocab_size=256, hidden_size=64, num_hidden_layers=len(layer_types), num_attention_heads=4,
                         chunk_size=8, layer_types=layer_types,
                         cms_levels=[{"period": 8, "intermediate_size": 96}, {"period": 32, "intermediate_size": 96}])
        torch.manual_seed(0)
        ref = HopeForCausalLM(cfg).double()
        ref_logits, ref_loss, ref_grads = run(ref, torch.device("cpu"))
        for dtype in (torch.float64, torch.float32):
            model = copy.deepcopy(ref).to(device=device, dtype=dtype)
            logits, loss, grads = run(model, device)
            out[f"{name}_{str(dtype).split('.')[-1]}"] = {
                "logits_rel_err": rel_err(logits.cpu()[valid], ref_logits[valid]),
                "loss_rel_err": rel_err(loss, ref_loss),
                "max_grad_rel_err": max(rel_err(grads[n], g) for n, g in ref_grads.items() if g is not None),
                "grads_missing": sorted(n for n, g in ref_grads.items() if g is not None and grads[n] is None),
            }
        if name == "hybrid":
            # greedy generation: the recurrent cache (one-token steps) against re-running the whole prefix
            model = copy.deepcopy(ref).to(device=device, dtype=torch.float32).eval()
            prompt = ids[:1, :19].to(device)
            with torch.no_grad():
                cached = model.generate(prompt, max_new_tokens=24, do_sample=False, use_cache=True)
                uncached = model.generate(prompt, max_new_tokens=24, do_sample=False, use_cache=False)
            out["generate_cached_equals_uncached"] = bool(torch.equal(cached, uncached))
            # bf16 autocast training step (Trainer(bf16=True)): float32 weights, finite gradients, close loss
            model = copy.deepcopy(ref).to(device=device, dtype=torch.float32).train()
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1),
                                                     labels[:, 1:].to(device).flatten())
            loss.backward()
            out["bf16_autocast"] = {
                "loss_rel_err_vs_float64": rel_err(loss, ref_loss),
                "grads_finite": all(bool(torch.isfinite(p.grad).all()) for p in model.parameters()
                                    if p.grad is not None),
            }
    ok = (out["titans_float64"]["max_grad_rel_err"] < 1e-10 and out["titans_float64"]["logits_rel_err"] < 1e-12
          and all(out[k]["max_grad_rel_err"] < 1e-3 and not out[k]["grads_missing"]
                  for k in ("titans_float32", "hybrid_float64", "hybrid_float32"))
          and out["generate_cached_equals_uncached"]
          and out["bf16_autocast"]["grads_finite"] and out["bf16_autocast"]["loss_rel_err_vs_float64"] < 5e-2)
    out["passed"] = bool(ok)
    print(f"correctness: {json.dumps(out)}", flush=True)
    return out


# ------------------------------------------------------------------------------------------------------- training
def build(kind, preset, overrides, device):
    from decode import llama_like

    from hope_hf import HopeForCausalLM
    from hope_hf.presets import get_preset

    config = get_preset(preset, **overrides)
    torch.manual_seed(0)
    model = HopeForCausalLM(config) if kind == "hope" else llama_like(config)
    return model.to(device).train(), config


def count_flops_per_token(kind, preset, overrides, length, device) -> float:
    """Matmul FLOPs (forward + backward) per token of one training step, without recomputation. HOPE's cost is
    linear in length: counted at min(length, 512); Llama's attention is not: counted at `length`."""
    count_len = min(length, 512) if kind == "hope" else length
    model, config = build(kind, preset, {**overrides, "recompute_memory_states": False} if kind == "hope"
                          else overrides, device)
    ids = torch.randint(0, config.vocab_size, (1, count_len), device=device)
    with flop_counter() as counter:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    del model
    return counter.get_total_flops() / count_len


def train_rows(args, device, clock, preset, lengths, kind, first_warmup=True):
    """Tokens/s and peak memory of `kind` on `preset` at each length (one model, lengths in order)."""
    model, config = build(kind, preset, args.overrides, device)
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for i, length in enumerate(lengths):
        ids = torch.randint(0, config.vocab_size, (args.batch, length), device=device)

        def step():
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            model.zero_grad(set_to_none=True)

        if device.type == "cuda":
            gc.collect()  # the models of earlier rows, and their CUDA graphs, are gone
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        first_step = None
        if i == 0 and first_warmup:
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            first_step = time.perf_counter() - t0
        sec, n = timed_steps(step, device, max_steps=args.repeats, max_seconds=args.max_seconds)
        row = {"model": kind, "preset": preset, "length": length, "batch": args.batch, "parameters": params,
               "step_seconds": sec, "timed_steps": n, "tokens_per_second": args.batch * length / sec,
               "first_step_seconds": first_step}
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        rows.append(row)
        print(f"train {kind:>5} {preset:>5} {length:>5}: {sec:8.3f} s/step, {row['tokens_per_second']:10.0f} tok/s, "
              f"peak {row.get('peak_memory_gib', float('nan')):6.2f} GiB", flush=True)
        if clock.left() < args.reserve_s:
            break
    return rows


def add_flops(row, args, device, peak_flops, counted: dict):
    """The row's model FLOPs per token (`count_flops_per_token`, cached in `counted` by model, preset and length)
    and its model FLOP utilisation against `peak_flops`. Counting is a bonus: an error keeps the timing."""
    key = (row["model"], row["preset"], row["length"])
    try:
        if key not in counted:
            counted[key] = count_flops_per_token(row["model"], row["preset"], args.overrides, row["length"], device)
        row["flops_per_token"] = counted[key]
        row["model_flops_utilisation"] = counted[key] * row["tokens_per_second"] / peak_flops
    except Exception as exc:
        row["flops_error"] = repr(exc)[:300]


def add_ratios_to_llama(row, llama):
    """HOPE's tokens/s and peak memory in `row` as ratios to Llama's row of the same preset and length."""
    row["speed_ratio_vs_llama"] = row["tokens_per_second"] / llama["tokens_per_second"]
    if "peak_memory_gib" in row:
        row["memory_ratio_vs_llama"] = row["peak_memory_gib"] / llama["peak_memory_gib"]


def section_training(args, device, clock, lengths, presets, peak_flops, first_warmup=True):
    out = []
    for preset in presets:
        for kind in ("llama", "hope"):
            if clock.left() < args.reserve_s:
                print(f"training: out of time before {kind} {preset}", flush=True)
                return out
            rows = train_rows(args, device, clock, preset, lengths, kind, first_warmup)
            for row in rows:
                add_flops(row, args, device, peak_flops, {})
            out.extend(rows)
    by = {(r["preset"], r["length"], r["model"]): r for r in out}
    for (preset, length, kind), row in by.items():
        llama = by.get((preset, length, "llama"))
        if kind == "hope" and llama:
            add_ratios_to_llama(row, llama)
            print(f"hope/llama {preset} {length}: speed {row['speed_ratio_vs_llama']:.3f}x, memory "
                  f"{row.get('memory_ratio_vs_llama', float('nan')):.2f}x, MFU hope "
                  f"{row.get('model_flops_utilisation', float('nan')):.2%} llama "
                  f"{llama.get('model_flops_utilisation', float('nan')):.2%}", flush=True)
    return out


# -------------------------------------------------------------------------------------------------------- profile
def section_profile(args, device, length, variant="eager"):
    """`variant` (a `GRAPH_VARIANTS` name): its first step (capture, compilation) runs before the profiled one."""
    from torch.profiler import ProfilerActivity, profile

    model, config = build("hope", "tiny", {**args.overrides, **GRAPH_VARIANTS[variant]}, device)
    ids = torch.randint(0, config.vocab_size, (args.batch, length), device=device)

    def step():
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    wall, _ = timed_steps(step, device, max_steps=3)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        sync(device)
    kernel_us, kernels, by_name = 0.0, 0, {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            us = e.time_range.elapsed_us()
            kernel_us += us
            kernels += 1
            total = by_name.setdefault(e.name[:80], [0, 0.0])
            total[0] += 1
            total[1] += us
    top = sorted(by_name.items(), key=lambda item: -item[1][1])[:12]
    out = {"preset": "tiny", "variant": variant, "length": length, "batch": args.batch, "wall_seconds": wall,
           "device_kernel_seconds": kernel_us / 1e6, "device_kernels": kernels,
           "device_busy_fraction": kernel_us / 1e6 / wall, "wall_us_per_kernel": wall * 1e6 / max(kernels, 1),
           "top_kernels": [{"name": name, "calls": calls, "seconds": us / 1e6} for name, (calls, us) in top]}
    print("profile: " + ", ".join(f"{k} {v}" for k, v in out.items() if k != "top_kernels"), flush=True)
    for kernel in out["top_kernels"]:
        print(f"profile kernel: {kernel['seconds'] * 1e3:9.2f} ms {kernel['calls']:>7} calls  {kernel['name']}",
              flush=True)
    return out


# ------------------------------------------------------------------------------------------------------- compiled
def section_compiled(args, device, length):
    """HOPE training with the chunk step compiled (`compile_chunk_step`, inductor) against eager: one model, the same
    input, the option switched on between the two."""
    model, config = build("hope", "tiny", args.overrides, device)
    ids = torch.randint(0, config.vocab_size, (args.batch, length), device=device)
    losses = {}

    def step(name):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        losses[name] = float(loss.detach())

    step("eager")
    eager, _ = timed_steps(lambda: step("eager"), device, max_steps=3)
    allow_recompiles()
    model.config.compile_chunk_step = True
    sync(device)
    t0 = time.perf_counter()
    step("compiled")  # compiles: the forward, and the backward inside the first backward pass
    step("compiled")
    sync(device)
    first_two = time.perf_counter() - t0
    compiled, _ = timed_steps(lambda: step("compiled"), device, max_steps=3)
    out = {"preset": "tiny", "length": length, "batch": args.batch, "eager_step_seconds": eager,
           "compiled_step_seconds": compiled, "speedup": eager / compiled,
           "compile_and_two_steps_seconds": first_two, "loss_eager": losses["eager"],
           "loss_compiled": losses["compiled"]}
    print(f"compiled chunk step: {out}", flush=True)
    return out


# --------------------------------------------------------------------------------------------------------- decode
def decode_models(args, cfg, device) -> dict:
    """HOPE, the Llama of its size and, with --baseline-memory, HOPE with that file's Titans layer (same weights)."""
    from decode import llama_like

    from hope_hf import HopeForCausalLM

    torch.manual_seed(0)
    hope = HopeForCausalLM(cfg).to(device).eval()
    models = {"hope": hope, "llama": llama_like(cfg).to(device).eval()}
    if args.baseline_memory:
        from layer_versions import load_module

        baseline = load_module("baseline_memory_hope", args.baseline_memory)
        old = copy.deepcopy(hope)
        for i, layer in enumerate(old.model.layers):
            if hasattr(layer, "titans"):
                fresh = baseline.HopeSelfModifyingTitans(cfg, i).to(device)
                fresh.load_state_dict(layer.titans.state_dict())
                layer.titans = fresh
        models["hope_baseline"] = old.eval()
    if args.decode_graphs:
        graphed = copy.deepcopy(hope)
        graphed.config.memory_cuda_graphs = True  # one-token steps replayed from CUDA graphs
        models["hope_graphs"] = graphed
    if args.compile_decode:
        models["hope_compiled"] = torch.compile(hope)
    return models


def section_decode(args, device, clock, contexts, preset):
    """ms/token after `context` tokens; every HOPE variant decodes the same tokens, and its logits are compared
    with the eager current one (`*_max_logit_diff`). Variants other than hope and llama run at the shortest context
    only (their cost per token does not depend on it)."""
    from decode import cache_kwarg
    from transformers import DynamicCache

    from hope_hf.cache_hope import HopeCache
    from hope_hf.presets import get_preset

    cfg = get_preset(preset, **args.overrides)
    models = decode_models(args, cfg, device)
    allow_recompiles()
    rows, fill_rate = [], {}
    for context in contexts:
        row = {"preset": preset, "context": context}
        ids = torch.randint(0, cfg.vocab_size, (1, context), device=device)
        logits = {}
        for kind, model in models.items():
            if kind not in ("hope", "llama") and context != min(contexts):
                continue
            expected = fill_rate.get(kind, 0.0) * context  # seconds, from the shortest context's fill
            if clock.left() < args.reserve_s + expected:
                print(f"decode: no time for {kind} at {context} (about {expected:.0f} s)", flush=True)
                return rows
            cache = DynamicCache() if kind == "llama" else HopeCache(cfg)
            with torch.no_grad():
                sync(device)
                t0 = time.perf_counter()
                for lo in range(0, context, args.piece):
                    model(input_ids=ids[:, lo:lo + args.piece], use_cache=True, logits_to_keep=1,
                          **cache_kwarg(model, cache))
                sync(device)
                row[f"{kind}_fill_seconds"] = time.perf_counter() - t0
                fill_rate.setdefault(kind, row[f"{kind}_fill_seconds"] / context)
                tok = ids[:, -1:]
                # compiled: compilation and recompiles; graphs: an eager step, then the capture
                warm = {"hope_compiled": args.decode_steps, "hope_graphs": 2}.get(kind, 1)

                def step(i):
                    pos = torch.full((1, 1), context + i, device=device)
                    out = model(input_ids=tok, attention_mask=torch.ones(1, context + i + 1, dtype=torch.long,
                                device=device), position_ids=pos, use_cache=True, **cache_kwarg(model, cache))
                    return out.logits[:, -1].float()

                sync(device)
                t0 = time.perf_counter()
                seq = [step(i) for i in range(warm)]
                sync(device)
                row[f"{kind}_warmup_seconds"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                seq += [step(warm + i) for i in range(args.decode_steps)]
                sync(device)
                row[f"{kind}_ms_per_token"] = 1000 * (time.perf_counter() - t0) / args.decode_steps
                logits[kind] = torch.stack(seq[: args.decode_steps])
        for kind in logits:
            if kind.startswith("hope_"):
                row[f"{kind}_max_logit_diff"] = float((logits[kind] - logits["hope"]).abs().max())
        row["hope_speedup_vs_llama"] = row["llama_ms_per_token"] / row["hope_ms_per_token"]
        rows.append(row)
        print(f"decode {preset} ctx {context}: {row}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------- chunk sizes
def hope_variant_rows(args, device, clock, length, variants, preset="tiny"):
    """HOPE training steps of `preset` at `length` under each dict of config overrides in `variants` (a "variant"
    key names the dict in the rows and is not a config field)."""
    rows = []
    for variant in variants:
        if clock.left() < args.reserve_s:
            break
        saved = args.overrides
        args.overrides = {**saved, **{k: v for k, v in variant.items() if k != "variant"}}
        try:
            row = train_rows(args, device, clock, preset, [length], "hope")[0]
        except torch.OutOfMemoryError as exc:  # keep the other variants' rows
            row = {"model": "hope", "preset": preset, "length": length, "batch": args.batch,
                   "error": str(exc).split(". ")[0] + " (out of memory)"}
            print(f"train  hope {preset:>5} {length:>5} {variant}: out of memory", flush=True)
        finally:
            args.overrides = saved
            gc.collect()
        rows.append({**row, **variant})
    return rows


GRAPH_VARIANTS = {
    "eager": {"memory_cuda_graphs": False},
    "compiled": {"compile_chunk_step": True},
    "graphs": {"memory_cuda_graphs": True},
    "graphs_compiled": {"memory_cuda_graphs": True, "compile_chunk_step": True},
    "graphs_no_recompute": {"memory_cuda_graphs": True, "recompute_memory_states": False},
    "graphs_compiled_no_recompute": {"memory_cuda_graphs": True, "compile_chunk_step": True,
                                     "recompute_memory_states": False},
}


def section_cuda_graphs(args, device, clock, runs, variant_names, peak_flops):
    """HOPE training steps with the memory scan replayed from CUDA graphs (`memory_cuda_graphs`), with and without
    the compiled chunk step (`compile_chunk_step`), against the eager scan and Llama, same run
    (`first_step_seconds`: the step that captures and compiles). On a CPU the graphs option is ignored."""
    variants = [{"variant": name, **GRAPH_VARIANTS[name]} for name in variant_names]
    rows, counted = [], {}
    for preset, length in runs:
        if clock.left() < args.reserve_s:
            break
        llama = train_rows(args, device, clock, preset, [length], "llama")[0]
        hope = hope_variant_rows(args, device, clock, length, variants, preset)
        eager = next((row for row in hope if row["variant"] == "eager" and "error" not in row), None)
        add_flops(llama, args, device, peak_flops, counted)
        for row in hope:
            if "error" in row:
                continue
            add_flops(row, args, device, peak_flops, counted)  # the model's FLOPs: the same for every variant
            add_ratios_to_llama(row, llama)
            if eager:
                row["speedup_vs_eager"] = row["tokens_per_second"] / eager["tokens_per_second"]
            print(f"cuda graphs {preset} {length} {row['variant']:>28}: "
                  f"{row.get('speedup_vs_eager', math.nan):.2f}x eager, "
                  f"{row['speed_ratio_vs_llama']:.4f}x llama, memory {row.get('memory_ratio_vs_llama', 0):.2f}x, "
                  f"first step {row['first_step_seconds']:.1f} s, MFU "
                  f"{row.get('model_flops_utilisation', math.nan):.3%} (llama "
                  f"{llama.get('model_flops_utilisation', math.nan):.2%})", flush=True)
        rows += [llama, *hope]
    return rows


def section_evaluation(args, device, clock, runs):
    """Evaluation forward passes (eval mode, no gradients, as `Trainer.evaluate` runs them) of Llama and of HOPE
    with the eager scan and with `memory_cuda_graphs` (a shape without gradients is captured on its second use):
    tokens/s, the logits of both HOPE variants compared, and the two passes before the graphs replay timed apart."""
    rows = []
    for preset, length in runs:
        if clock.left() < args.reserve_s:
            break
        logits = {}
        for name, kind, overrides in (("llama", "llama", {}), ("hope_eager", "hope", {"memory_cuda_graphs": False}),
                                      ("hope_graphs", "hope", {"memory_cuda_graphs": True})):
            model, config = build(kind, preset, {**args.overrides, **overrides}, device)
            model.eval()
            ids = torch.randint(0, config.vocab_size, (args.batch, length), device=device,
                                generator=torch.Generator(device).manual_seed(0))

            def step():
                with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                                     enabled=device.type == "cuda"):
                    return model(input_ids=ids).logits  # noqa: F821 (`del model` comes after its last step)

            first = []
            for _ in range(2):  # eager, then (graphs) the capture
                sync(device)
                t0 = time.perf_counter()
                out = step()
                sync(device)
                first.append(time.perf_counter() - t0)
            if kind == "hope":  # kept for the comparison of the two HOPE variants
                logits[name] = out.float()
            del out
            sec, n = timed_steps(step, device, max_steps=args.repeats, max_seconds=args.max_seconds)
            row = {"model": name, "preset": preset, "length": length, "batch": args.batch, "step_seconds": sec,
                   "timed_steps": n, "tokens_per_second": args.batch * length / sec, "first_two_seconds": first}
            rows.append(row)
            del model
            gc.collect()
            print(f"eval {name:>11} {preset:>5} {length:>5}: {sec:8.4f} s/batch, {row['tokens_per_second']:10.0f} "
                  f"tok/s (first two {first[0]:.2f}, {first[1]:.2f} s)", flush=True)
        by = {row["model"]: row for row in rows[-3:]}
        by["hope_graphs"]["logits_rel_err_vs_eager"] = rel_err(logits["hope_graphs"], logits["hope_eager"])
        for name in ("hope_eager", "hope_graphs"):
            by[name]["speed_ratio_vs_llama"] = by[name]["tokens_per_second"] / by["llama"]["tokens_per_second"]
        speedup = by["hope_graphs"]["tokens_per_second"] / by["hope_eager"]["tokens_per_second"]
        by["hope_graphs"]["speedup_vs_eager"] = speedup
        print(f"eval {preset} {length}: graphs {speedup:.2f}x eager, HOPE/Llama "
              f"{by['hope_eager']['speed_ratio_vs_llama']:.4f}x eager, "
              f"{by['hope_graphs']['speed_ratio_vs_llama']:.4f}x graphs; logits rel. err. "
              f"{by['hope_graphs']['logits_rel_err_vs_eager']:.1e}", flush=True)
    return rows


def section_chunk_sizes(args, device, clock, length, chunk_sizes):
    """HOPE tiny training steps at several chunk sizes (a model hyperparameter: the paper's is 16): the number of
    sequential chunk steps is what a launch-bound GPU step pays for."""
    return hope_variant_rows(args, device, clock, length, [{"chunk_size": c} for c in chunk_sizes])


def section_recompute(args, device, clock, length):
    """HOPE tiny training steps with `recompute_memory_states` on (the default) and off: the second forward pass of
    the scan that recomputation costs, against the memory it saves."""
    return hope_variant_rows(args, device, clock, length, [{"recompute_memory_states": r} for r in (True, False)])


# ---------------------------------------------------------------------------------------------- whole-model compile
def section_compile_model(args, device):
    """`torch.compile(model)` (inductor) trains a short sequence with the same loss and gradients as eager."""
    out = {}
    for recompute in (False, True):
        model, config = build("hope", "tiny", {**args.overrides, "recompute_memory_states": recompute}, device)
        ids = torch.randint(0, config.vocab_size, (2, 64), device=device)

        def run(m):
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            model.zero_grad(set_to_none=True)
            return loss.detach(), grads

        loss_e, grads_e = run(model)
        compiled = torch.compile(model)
        sync(device)
        t0 = time.perf_counter()
        loss_c, grads_c = run(compiled)
        sync(device)
        key = f"recompute_{recompute}"
        out[key] = {"compile_seconds": time.perf_counter() - t0, "loss_rel_err": rel_err(loss_c, loss_e),
                    "max_grad_rel_err": max(rel_err(grads_c[n], g) for n, g in grads_e.items()),
                    "eager_step_seconds": timed_steps(lambda: run(model), device, max_steps=3)[0],
                    "compiled_step_seconds": timed_steps(lambda: run(compiled), device, max_steps=3)[0]}
        print(f"compile model {key}: {out[key]}", flush=True)
    return out


# ----------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument("--budget-s", type=float, default=480, help="seconds for the whole run (default: 480)")
    parser.add_argument("--reserve-s", type=float, default=20,
                        help="a section starts only with more than this many seconds left (default: 20)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps at most per measurement")
    parser.add_argument("--max-seconds", type=float, default=15, help="stop repeating a measurement after this")
    parser.add_argument("--piece", type=int, default=4096, help="tokens per forward while filling a decode cache")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")],
                        help="comma-separated decoding contexts (default: 1024,32768)")
    parser.add_argument("--baseline-memory", help="a memory_hope.py whose Titans layer HOPE also decodes with")
    parser.add_argument("--compile-decode", action="store_true", help="also decode with torch.compile(model)")
    parser.add_argument("--decode-graphs", action="store_true",
                        help="also decode with memory_cuda_graphs (the Titans layers' one-token steps replayed from "
                             "CUDA graphs)")
    parser.add_argument("--sections",
                        default="env,correctness,cuda_graphs,training,evaluation,profile,compiled,decode,chunk_sizes,"
                                "recompute,long,compile_model",
                        help="comma-separated sections to run, in this order")
    def runs(text):
        try:
            return [(preset, int(length)) for preset, length in (r.split(":") for r in text.split(","))]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected PRESET:LENGTH,... (e.g. tiny:2048), got {text!r}") from None

    parser.add_argument("--cuda-graph-runs", type=runs,
                        help="PRESET:LENGTH,... measured by the cuda_graphs section (default: tiny:2048,small:2048,"
                             "tiny:8192) and the evaluation section (default: tiny:2048,small:2048)")
    parser.add_argument("--cuda-graph-variants", type=lambda s: s.split(","),
                        default=["eager", "graphs", "graphs_compiled", "graphs_no_recompute",
                                 "graphs_compiled_no_recompute"],
                        help="HOPE variants of the cuda_graphs section, comma-separated, from: "
                             + ", ".join(GRAPH_VARIANTS) + " (default: all but compiled)")
    parser.add_argument("--profile-variant", default="eager", choices=list(GRAPH_VARIANTS),
                        help="the HOPE variant the profile section profiles (default: eager)")
    parser.add_argument("--profile-length", type=int, help="tokens per row in the profile section (default: 512)")
    parser.add_argument("--quick", action="store_true", help="CPU-sized everything: a smoke run for CI")
    parser.add_argument("--json", default="benchmarks/results/gpu.json", help="where to write the results")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device!r}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; pass --device cpu (e.g. --quick --device cpu, a dry run)")
    all_sections = parser.get_default("sections").split(",")
    unknown = sorted(set(args.sections.split(",")) - set(all_sections))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {', '.join(all_sections)}")
    unknown = sorted(set(args.cuda_graph_variants) - set(GRAPH_VARIANTS))
    if unknown:
        parser.error(f"--cuda-graph-variants: unknown {unknown}; choose from {', '.join(GRAPH_VARIANTS)}")
    check_sizes(parser, args, positive=("batch", "repeats", "piece", "decode_steps", "contexts", "profile_length"))
    if args.baseline_memory and not os.path.isfile(args.baseline_memory):
        parser.error(f"--baseline-memory {args.baseline_memory!r} is not a file")
    args.overrides = {}
    lengths, long_lengths, contexts, decode_preset = [2048], [8192], [1024, 32768], "small"
    presets, profile_len, compiled_len, chunk_sizes = ["tiny", "small"], 512, 2048, [16, 32, 64]
    if args.quick:
        args.overrides = {"vocab_size": 256}
        lengths, long_lengths, contexts, decode_preset = [64], [128], [32, 96], "tiny"
        chunk_sizes = [8, 16]
        presets, profile_len, compiled_len, args.piece, args.decode_steps, args.repeats = ["tiny"], 64, 64, 32, 2, 1
    contexts = args.contexts or contexts
    sections = args.sections.split(",")
    clock = Clock(args.budget_s)
    results, errors = {}, {}

    def attempt(name, fn, needs_cuda=False, min_left=0.0):
        if name not in sections:
            return None
        if needs_cuda and device.type != "cuda":
            results[name] = "skipped: needs a CUDA device"
            return None
        if clock.left() < max(args.reserve_s, min_left):
            results[name] = f"skipped: {clock.left():.0f} s of the budget left"
            print(f"{name}: {results[name]}", flush=True)
            return None
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as exc:
            errors[name] = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-2000:]
            print(f"{name} FAILED: {errors[name]}", flush=True)
            traceback.print_exc()
        print(f"[{name}: {time.perf_counter() - t0:.1f} s, {clock.left():.0f} s left]", flush=True)
        save_report(args, results=results, errors=errors)
        return results.get(name)

    env = attempt("env", lambda: section_env(args, device)) or {}
    # model FLOP utilisation against bf16 matmul on a GPU (the usual convention), float32 on a CPU
    peak = env.get("matmul_bfloat16_tflops" if device.type == "cuda" else "matmul_float32_tflops", 1.0) * 1e12
    attempt("correctness", lambda: section_correctness(args, device))
    graph_runs = args.cuda_graph_runs or [(preset, lengths[0]) for preset in presets] + [(presets[0], long_lengths[0])]
    compiled_on_cpu = args.quick and device.type == "cpu"  # inductor on a CPU takes minutes: not in a smoke run
    graph_variants = [v for v in args.cuda_graph_variants if not (compiled_on_cpu and "compiled" in v)]
    attempt("cuda_graphs", lambda: section_cuda_graphs(args, device, clock, graph_runs, graph_variants, peak))
    attempt("training", lambda: section_training(args, device, clock, lengths, presets, peak))
    eval_runs = args.cuda_graph_runs or [(preset, lengths[0]) for preset in presets]
    attempt("evaluation", lambda: section_evaluation(args, device, clock, eval_runs))
    attempt("profile", lambda: section_profile(args, device, args.profile_length or profile_len, args.profile_variant),
            needs_cuda=True)
    if compiled_on_cpu:
        results["compiled"] = "skipped: quick run on a CPU"
    else:
        attempt("compiled", lambda: section_compiled(args, device, compiled_len), min_left=150)
    attempt("decode", lambda: section_decode(args, device, clock, contexts, decode_preset))
    attempt("chunk_sizes", lambda: section_chunk_sizes(args, device, clock, lengths[0], chunk_sizes))
    attempt("recompute", lambda: section_recompute(args, device, clock, lengths[0]))
    attempt("long", lambda: section_training(args, device, clock, long_lengths, presets, peak, first_warmup=False))
    if compiled_on_cpu:
        results["compile_model"] = "skipped: quick run on a CPU"
    else:
        attempt("compile_model", lambda: section_compile_model(args, device), min_left=90)
    report = save_report(args, results=results, errors=errors)
    print(f"done in {args.budget_s - clock.left():.0f} s; errors: {sorted(errors) or 'none'}", flush=True)
    return report


if __name__ == "__main__":
    main()
