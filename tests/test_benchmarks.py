"""The benchmark scripts' `--quick` modes run end to end and write well-formed JSON (nothing is asserted about time)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_peers_quick(tmp_path):
    out = tmp_path / "peers.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/peers.py", "--quick", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["config"]["quick"] is True and report["threads"] == 1
    assert set(report["peers"]) == {"titans-pytorch", "nested-learning"}
    rows = {(r["impl"], r["length"]): r for r in report["rows"]}
    lengths = report["config"]["lengths"]
    for impl in ("ours_titans", "ours_selfmod"):  # our layers are always measured
        for length in lengths:
            row = rows[(impl, length)]
            assert row["status"] == "ok"
            assert math.isfinite(row["fwd_bwd_us_per_token"]) and row["fwd_bwd_us_per_token"] > 0
    for impl in ("titans_default", "titans_refresh", "nested_learning"):  # a peer is measured or "not installed"
        package = "nested-learning" if impl == "nested_learning" else "titans-pytorch"
        for length in lengths:
            row = rows[(impl, length)]
            expected = "not installed" if report["peers"][package] is None else "ok"
            assert row["status"] == expected, row
            assert (row["status"] == "ok") == ("fwd_bwd_us_per_token" in row)
    assert {(r["comparison"], r["peer"]) for r in report["ratios"]} == {
        ("titans", "titans_default"), ("titans", "titans_refresh"), ("nested_learning", "nested_learning")}
    for ratio in report["ratios"]:
        assert ("speedup_ours_vs_peer" in ratio) == (ratio["peer_status"] == "ok")
    assert set(report["targets"]) == {"titans", "nested_learning"}
    assert all(t["met"] is None for t in report["targets"].values())  # quick mode judges nothing
