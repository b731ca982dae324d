"""The self-modifying Titans layer against the other public implementations, forward + backward per token.

Two comparisons, each at equal width, heads (where the peer has heads) and chunk size, measured in one process:

* `HopeSelfModifyingTitans` with `self_modifying=False` (one deep memory with static keys, values and gates, like
  Titans) against titans-pytorch's `NeuralMemory` (PyPI `titans-pytorch`), in two configurations: its default
  (`batch_size=None`: every chunk's gradient is taken at the sequence's initial weights, all in one parallel call)
  and `batch_size=chunk_size` (the weights are refreshed after every chunk, so each chunk's gradient is taken at the
  weights after the previous chunk, as in our layer and the Titans paper).
* the full self-modifying layer against nested-learning's `SelfModifyingTitans` (PyPI `nested-learning`,
  `nested_learning.titan.self_modifying`). Its memory updates run under `torch.no_grad()` in an explicit pass
  (`forward_with_updates`, the path its HOPE block uses in context); gradients reach the meta-parameters only
  through a separate read without updates (`module(x)`). Its "forward + backward" is therefore the update pass plus
  that read's forward + backward (what its block does per training step); ours backpropagates through every update.

Each row is the median of `--repeats` timings after a warm-up, in microseconds per token (batch x length), and the
ratio theirs / ours (above 1: ours is faster). The repeats are interleaved across implementations, and with one
thread (the default) the time is this process's CPU time, so other jobs on a shared machine shift all rows alike
and do not count (the wall time is in the JSON too).

    python benchmarks/peers.py --install            # once: a venv in benchmarks/.peers-env, then runs in it
    benchmarks/.peers-env/bin/python benchmarks/peers.py --threads 1
    python benchmarks/peers.py --quick              # a few seconds: what CI runs (asserts nothing about time)

Without the peer packages it still times our layers and reports each peer as "not installed".
"""

from __future__ import annotations

import argparse
import itertools
import hashlib
import os
import statistics
import subprocess
import sys
import time
from importlib import metadata

import torch
from _report import check_sizes, save_report, source_state

HERE = os.path.dirname(os.path.abspath(__file__))
ENV_DIR = os.path.join(HERE, ".peers-env")
PEER_PACKAGES = {"titans-pytorch": "0.5.5", "nested-learning": "0.2.0"}


# ---------------------------------------------------------------------------------------------------- install
def env_python(env_dir: str = ENV_DIR) -> str:
    return os.path.join(env_dir, "Scripts" if os.name == "nt" else "bin", "python")


def install(env_dir: str = ENV_DIR) -> str:
    """Create `env_dir` (a venv that sees this interpreter's packages) and install the peers there, never touching
    torch or any package this interpreter already has (a constraints file pins them all at their installed
    versions, torch included). Returns the env's python."""
    if not os.path.exists(env_python(env_dir)):
        print(f"creating {env_dir} (venv --system-site-packages)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", env_dir], check=True)
        with open(os.path.join(env_dir, ".gitignore"), "w") as f:
            f.write("*\n")
    py = env_python(env_dir)
    # pin every installed distribution (torch without its local suffix: torch==2.13.0 matches 2.13.0+cpu, and
    # no other torch may be downloaded); editable and URL installs cannot be constraints and are skipped
    torch_version = torch.__version__.split("+")[0]
    pins = {"torch": f"torch=={torch_version}"}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() != "torch" and dist.read_text("direct_url.json") is None:
            pins.setdefault(name.lower(), f"{name}=={dist.version}")
    constraints = os.path.join(env_dir, "constraints.txt")
    with open(constraints, "w") as f:
        f.write("\n".join(sorted(pins.values())) + "\n")
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "-c", constraints]
    # titans-pytorch: with its dependencies (einops, einx, tensordict, assoc-scan, x-transformers, ...)
    subprocess.run(pip + [f"titans-pytorch=={PEER_PACKAGES['titans-pytorch']}"], check=True)
    # nested-learning: without dependencies. It pins datasets<3 and huggingface-hub<1, which would shadow the
    # versions transformers needs; the layer measured here (nested_learning.titan.self_modifying) imports only torch.
    subprocess.run(pip + ["--no-deps", f"nested-learning=={PEER_PACKAGES['nested-learning']}"], check=True)
    subprocess.run([py, "-c", "import torch; print('torch in the peers env:', torch.__version__, torch.__file__)"],
                   check=True)
    return py


# ---------------------------------------------------------------------------------------------------- layers
def ours(args, self_modifying: bool, **overrides):
    from hope_hf import HopeConfig
    from hope_hf.memory_hope import HopeSelfModifyingTitans

    cfg = HopeConfig(vocab_size=128, hidden_size=args.hidden, num_hidden_layers=1, num_attention_heads=args.heads,
                     chunk_size=args.chunk_size, memory_expansion=args.memory_expansion,
                     self_modifying=self_modifying, **overrides)
    layer = HopeSelfModifyingTitans(cfg, 0)
    layer.init_memory_weights()

    def fwd(x):
        with torch.no_grad():
            layer.forward_with_state(x)

    def fwd_bwd(x):
        out, _ = layer.forward_with_state(x)
        out.sum().backward()

    return layer, fwd, fwd_bwd


def speed_overrides() -> dict:
    """Our layer keeps every activation for the backward, as the peers do: where the config can recompute the memory
    states in the backward instead (activation checkpointing, less memory for more compute), that is turned off."""
    from hope_hf import HopeConfig

    fields = getattr(HopeConfig, "__dataclass_fields__", {})
    return {"recompute_memory_states": False} if "recompute_memory_states" in fields else {}


def titans_pytorch(args, refresh_every_chunk: bool):
    from titans_pytorch import NeuralMemory

    mem = NeuralMemory(
        dim=args.hidden,
        heads=args.heads,
        dim_head=args.hidden // args.heads,
        chunk_size=args.chunk_size,
        batch_size=args.chunk_size if refresh_every_chunk else None,
        # memory MLP d -> m -> d with m = memory_expansion * d, as ours (its default is expansion 4)
        default_model_kwargs=dict(depth=2, expansion_factor=float(args.memory_expansion)),
    )

    def fwd(x):
        with torch.no_grad():
            mem(x)

    def fwd_bwd(x):
        out, _ = mem(x)
        out.sum().backward()

    return mem, fwd, fwd_bwd


def nested_learning(args):
    from nested_learning.titan.self_modifying import SelfModifyingTitans, SelfModifyingTitansConfig

    layer = SelfModifyingTitans(SelfModifyingTitansConfig(
        dim=args.hidden, chunk_size_other=args.chunk_size, chunk_size_memory=args.chunk_size))

    def update_pass(x):  # the in-context forward: reads and chunked self-modifying updates, under no_grad
        layer.forward_with_updates(x, layer.init_fast_state())

    def read_fwd_bwd(x):  # the differentiable read without updates, the only path gradients take
        layer(x).sum().backward()

    return layer, update_pass, read_fwd_bwd


# ---------------------------------------------------------------------------------------------------- timing
def median_time(fn, x, repeats, warmup_x=None):
    fn(x if warmup_x is None else warmup_x)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peer_version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def layer_source():
    """The commit measured, whether hope_hf/ had uncommitted changes (the layer is being optimised), and a hash of
    the layer's file."""
    commit, changed = source_state("hope_hf")
    with open(os.path.join(os.path.dirname(HERE), "hope_hf", "memory_hope.py"), "rb") as f:
        layer_sha1 = hashlib.sha1(f.read()).hexdigest()
    return {"commit": commit, "hope_hf_uncommitted_changes": changed, "memory_hope_py_sha1": layer_sha1}


def params(module):
    return sum(p.numel() for p in module.parameters())


COMPARISONS = [
    # (comparison, ours self_modifying, peer key, peer label, peer package)
    ("titans", False, "titans_default", "titans-pytorch NeuralMemory (batch_size=None)", "titans-pytorch"),
    ("titans", False, "titans_refresh", "titans-pytorch NeuralMemory (batch_size=chunk)", "titans-pytorch"),
    ("nested_learning", True, "nested_learning", "nested-learning SelfModifyingTitans", "nested-learning"),
]


def clock(args):
    """CPU time of this process with one thread (the other jobs on a shared machine do not count), else wall time."""
    return "cpu" if args.threads == 1 else "wall"


def time_once(fn, x):
    wall, cpu = time.perf_counter(), time.process_time()
    fn(x)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(args):
    torch.manual_seed(0)
    rows, ratios = [], []
    base = speed_overrides()
    builders = {
        "ours_titans": lambda: ours(args, self_modifying=False, **base),
        "ours_selfmod": lambda: ours(args, self_modifying=True, **base),
        "titans_default": lambda: titans_pytorch(args, refresh_every_chunk=False),
        "titans_refresh": lambda: titans_pytorch(args, refresh_every_chunk=True),
        "nested_learning": lambda: nested_learning(args),
    }
    labels = {
        "ours_titans": "hope-hf HopeSelfModifyingTitans (self_modifying=False)",
        "ours_selfmod": "hope-hf HopeSelfModifyingTitans (self_modifying=True)",
        **{key: label for _, _, key, label, _ in COMPARISONS},
    }
    if args.ablations:  # where our time goes: the same layers without the delta rule's triangular solve
        builders["ours_titans_nodgd"] = lambda: ours(args, self_modifying=False, dgd=False, **base)
        builders["ours_selfmod_nodgd"] = lambda: ours(args, self_modifying=True, dgd=False, **base)
        labels["ours_titans_nodgd"] = "  ablation: self_modifying=False, dgd=False"
        labels["ours_selfmod_nodgd"] = "  ablation: self_modifying=True, dgd=False"
        if base:  # and the layer's default: activation checkpointing of the memory states (less memory)
            builders["ours_titans_recompute"] = lambda: ours(args, self_modifying=False)
            builders["ours_selfmod_recompute"] = lambda: ours(args, self_modifying=True)
            labels["ours_titans_recompute"] = "  ablation: self_modifying=False, recompute_memory_states=True"
            labels["ours_selfmod_recompute"] = "  ablation: self_modifying=True, recompute_memory_states=True"
    variants = [""]
    if args.compile_chunk_step:  # our layers once more, the chunk step compiled (the warm-up pass compiles it)
        variants.append("_compiled")
        for mine, self_mod in (("ours_titans", False), ("ours_selfmod", True)):
            builders[mine + "_compiled"] = (
                lambda self_mod=self_mod: ours(args, self_modifying=self_mod, compile_chunk_step=True, **base))
            labels[mine + "_compiled"] = labels[mine] + ", compile_chunk_step"
    packages = {key: pkg for _, _, key, _, pkg in COMPARISONS}
    built, status = {}, {}
    for key, build in builders.items():
        pkg = packages.get(key)
        if key in args.skip:
            status[key] = "skipped"
            continue
        if pkg and peer_version(pkg) is None:
            status[key] = "not installed"
            continue
        try:
            built[key] = build()
            status[key] = "ok"
        except Exception as exc:  # a peer whose API moved: report it, keep measuring the rest
            status[key] = f"error: {type(exc).__name__}: {exc}"
    for key, s in status.items():
        if s != "ok":
            print(f"{labels[key]}: {s}", flush=True)

    which = clock(args)
    for length in args.lengths:
        x = torch.randn(args.batch, length, args.hidden, requires_grad=True)
        tokens = args.batch * length
        # the timed functions of every implementation: (key, part, fn, repeats)
        parts = []
        for key in builders:
            if status[key] != "ok":
                continue
            _, fwd, fwd_bwd = built[key]
            if key == "nested_learning":  # fwd = the update pass; fwd+bwd = update pass + read fwd+bwd
                parts += [(key, "update_pass", fwd, args.nl_repeats), (key, "read_fwd_bwd", fwd_bwd, args.nl_repeats)]
            else:
                parts += [(key, "fwd", fwd, args.repeats), (key, "fwd_bwd", fwd_bwd, args.repeats)]
        errors = {}
        for key, part, fn, _ in parts:  # warm-up (a per-token loop warms up on two chunks)
            try:
                fn(x[:, : 2 * args.chunk_size] if key == "nested_learning" else x)
            except Exception as exc:
                errors[key] = f"error: {type(exc).__name__}: {exc}"
        samples = {(key, part): {"wall": [], "cpu": []} for key, part, _, _ in parts}
        # repeats interleaved across implementations, so that a change in the machine's load hits all of them
        for r in range(max([n for *_, n in parts], default=0)):
            for key, part, fn, n in parts:
                if r < n and key not in errors:
                    wall, cpu = time_once(fn, x)
                    samples[(key, part)]["wall"].append(wall)
                    samples[(key, part)]["cpu"].append(cpu)
        us = {}
        for key in builders:
            row = {"impl": key, "label": labels[key].strip(), "length": length, "batch": args.batch,
                   "status": errors.get(key, status[key])}
            if row["status"] == "ok":
                module = built[key][0]
                row["parameters"] = params(module)
                med = {(part, c): 1e6 * statistics.median(v) / tokens
                       for (k, part), by_clock in samples.items() if k == key for c, v in by_clock.items()}
                for c in ("wall", "cpu"):
                    suffix = "" if c == which else f"_{c}"
                    if key == "nested_learning":
                        row["update_pass_us_per_token" + suffix] = med[("update_pass", c)]
                        row["read_fwd_bwd_us_per_token" + suffix] = med[("read_fwd_bwd", c)]
                        row["fwd_us_per_token" + suffix] = med[("update_pass", c)]
                        row["fwd_bwd_us_per_token" + suffix] = med[("update_pass", c)] + med[("read_fwd_bwd", c)]
                    else:
                        row["fwd_us_per_token" + suffix] = med[("fwd", c)]
                        row["fwd_bwd_us_per_token" + suffix] = med[("fwd_bwd", c)]
                us[key] = row["fwd_bwd_us_per_token"]
                other = "wall" if which == "cpu" else "cpu"
                print(f"T={length:>5} {labels[key]:<56} fwd {row['fwd_us_per_token']:9.1f}  fwd+bwd "
                      f"{row['fwd_bwd_us_per_token']:9.1f} us/tok {which} time ({other}: "
                      f"{row['fwd_bwd_us_per_token_' + other]:.1f})", flush=True)
            else:
                print(f"T={length:>5} {labels[key]}: {row['status']}", flush=True)
            rows.append(row)
        for (comparison, self_mod, peer, peer_label, _), variant in itertools.product(COMPARISONS, variants):
            mine = ("ours_selfmod" if self_mod else "ours_titans") + variant
            entry = {"comparison": comparison + variant, "length": length, "ours": mine, "peer": peer,
                     "ours_fwd_bwd_us_per_token": us.get(mine), "peer_fwd_bwd_us_per_token": us.get(peer),
                     "peer_status": errors.get(peer, status[peer])}
            if mine in us and peer in us:
                entry["speedup_ours_vs_peer"] = us[peer] / us[mine]
            ratios.append(entry)
    return rows, ratios


def print_table(ratios):
    print("\n| comparison | length | ours us/token | peer | peer us/token | ours faster by |")
    print("|---|---|---|---|---|---|")
    for r in ratios:
        peer_us = r["peer_fwd_bwd_us_per_token"]
        ours_us = r["ours_fwd_bwd_us_per_token"]
        speed = r.get("speedup_ours_vs_peer")
        print(f"| {r['comparison']} | {r['length']} | {ours_us:.0f} | {r['peer']} | "
              f"{'%.0f' % peer_us if peer_us is not None else r['peer_status']} | "
              f"{'%.2fx' % speed if speed is not None else '-'} |" if ours_us is not None else
              f"| {r['comparison']} | {r['length']} | - | {r['peer']} | {r['peer_status']} | - |")


def targets(ratios):
    """Target 6 of docs/performance.md, judged on every measured length (and, for titans, both configurations)."""
    out = {}
    for (comparison, need), variant in itertools.product((("titans", 1.0), ("nested_learning", 10.0)),
                                                         ("", "_compiled")):
        comparison += variant
        mine = [r for r in ratios if r["comparison"] == comparison and "speedup_ours_vs_peer" in r]
        if variant and not mine:
            continue
        got = [r["speedup_ours_vs_peer"] for r in mine]
        ok = (lambda v: v > need) if need == 1.0 else (lambda v: v >= need)  # "faster", "at least 10x"
        out[comparison] = {
            "required_speedup": need,
            "min_measured_speedup": min(got) if got else None,
            "min_speedup_per_peer": {p: min(r["speedup_ours_vs_peer"] for r in mine if r["peer"] == p)
                                     for p in sorted({r["peer"] for r in mine})},
            "met": all(map(ok, got)) if got else None,
        }
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--install", action="store_true",
                        help=f"create {os.path.relpath(ENV_DIR)} with the peer packages, then rerun there")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048], help="sequence lengths")
    parser.add_argument("--batch", type=int, default=2, help="batch size")
    parser.add_argument("--hidden", type=int, default=256, help="width (heads x head size)")
    parser.add_argument("--heads", type=int, default=4, help="number of heads (nested-learning has none: one)")
    parser.add_argument("--chunk-size", type=int, default=16, help="chunk size, for every implementation")
    parser.add_argument("--memory-expansion", type=int, default=2, help="memory hidden width / head size")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions after a warm-up (median kept)")
    parser.add_argument("--nl-repeats", type=int, default=2,
                        help="timed repetitions for nested-learning (a pass over 2x2048 tokens takes about a minute)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (with 1, times are this process's CPU time, else wall time)")
    parser.add_argument("--ablations", action="store_true",
                        help="also time our layers with dgd=False (without the delta rule's triangular solve)")
    parser.add_argument("--skip", nargs="+", default=[],
                        choices=["titans_default", "titans_refresh", "nested_learning"],
                        help="peers not to run (nested-learning at width 1024 takes about 0.25 s per token)")
    parser.add_argument("--compile-chunk-step", action="store_true",
                        help="also time our layers with compile_chunk_step=True (Inductor; the warm-up pass "
                             "compiles, about a minute), judged against the peers as a configuration of their own")
    parser.add_argument("--json", default="benchmarks/results/peers.json", help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke run for CI")
    args = parser.parse_args(argv)
    check_sizes(parser, args, positive=("lengths", "batch", "hidden", "heads", "chunk_size", "memory_expansion",
                                        "repeats", "nl_repeats", "threads"))

    if args.install:
        py = install()
        rest = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--install"]
        print(f"\nrunning in the peers env; next time run directly:\n  {os.path.relpath(py)} "
              f"{os.path.relpath(os.path.abspath(__file__))} {' '.join(rest)}\n", flush=True)
        sys.stdout.flush()
        os.execv(py, [py, os.path.abspath(__file__), *rest])

    if args.quick:
        args.lengths, args.batch, args.hidden, args.heads, args.chunk_size = [16, 32], 1, 32, 4, 4
        args.repeats = args.nl_repeats = 1
    torch.set_num_threads(args.threads)
    versions = {name: peer_version(name) for name in PEER_PACKAGES}
    missing = [name for name, v in versions.items() if v is None]
    if missing:
        print(f"not installed: {', '.join(missing)} (python benchmarks/peers.py --install, or run with "
              f"{os.path.relpath(env_python())} if that env exists)", flush=True)
    rows, ratios = measure(args)
    print_table(ratios)
    met = targets(ratios)
    if args.quick:
        print("(quick mode: tiny sizes, a smoke run; the targets are judged on the full run)")
        met = {comparison: {**t, "met": None, "note": "quick mode: not judged"} for comparison, t in met.items()}
    for comparison, t in met.items():
        verdict = "not judged" if t["met"] is None else ("met" if t["met"] else "NOT met")
        print(f"target {comparison}: ours faster by {'>' if comparison.startswith('titans') else '>='} "
              f"{t['required_speedup']}x at every length -> {verdict}"
              f"{'' if t['min_measured_speedup'] is None else ' (min %.2fx)' % t['min_measured_speedup']}")
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return save_report(args, clock=clock(args), ours_config_overrides=speed_overrides(), peers=versions,
                       python=sys.executable, source=layer_source(), load_average=load, rows=rows, ratios=ratios,
                       targets=met)


if __name__ == "__main__":
    main()
