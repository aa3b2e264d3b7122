"""`make bench` in miniature: every path completes with zero lost events and writes its JSON.

No timing assertions: a shared 2-core machine makes wall times noise. codex-relay is measured
when it is installed (`pip install codex-relay`) and skipped otherwise; nothing is installed here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke(tmp_path):
    # an A/B against a copy of this tree's addon/ (as another tree's would be): its gateway must
    # load the copy's packages, not this tree's editable install (bench/probe.py says which)
    other = tmp_path / "other" / "addon"
    shutil.copytree(ROOT / "addon", other, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--no-install",
                           "--ab", str(other / "resp2chat.py"), "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    mods = results["modules"]
    assert all(Path(f).is_relative_to(ROOT / "addon") for f in mods["resp2chat"].values()), mods
    assert all(Path(f).is_relative_to(other) for f in mods["resp2chat-b"].values()), mods

    paths = results["paths"]
    assert {"direct", "passthrough", "resp2chat", "resp2chat-b"} <= set(paths), list(paths)
    for name, r in paths.items():
        assert r["lost_events"] == 0, (name, r)
        assert r["failed_answers"] == 0, (name, r.get("first_error"))
        for phase in ("c1", "paced", "c64"):
            assert r[phase]["answers"] > 0, (name, phase)
        if name != "direct":
            assert r["rss"]["peak_mb"] > 0
            assert r["c64"]["cpu_us_per_event"] is not None
    assert results["replay"]["lost_events"] == 0 and results["replay"]["answers"] > 0
    il = results["interleaved"]  # the CPU phases again, gateways taking turns
    assert il["lost_events"] == 0 and il["c64"]["ratio_median"]["resp2chat/passthrough"] > 0
    assert il["paced"]["ratio_median"]["resp2chat-b/resp2chat"] > 0 and "median_b_minus_a_ms" in il["c1"]
    assert set(results["targets"]) >= {"lost_events", "added_ttft_p50_c1_ms", "replay_hit_speedup_vs_scripted_upstream"}
    real = results["replay_real"]  # against llama.cpp's server when `make llamacpp` has built it
    if "skipped" not in real:
        assert real["pairs"] == 1 and real["mismatched_pairs"] == 0, real
        assert results["targets"]["replay_hit_speedup"]["value"] > 0
    ws = results["websocket"]  # one Codex conversation over the Responses WebSocket, over HTTP, and direct
    for name in ("websocket", "http", "direct"):
        assert ws[name]["lost_events"] == 0 and ws[name]["failed_answers"] == 0, (name, ws[name])
        assert ws[name]["total_ms"]["n"] == ws["turns"] * ws["rounds"]
    # (a smoke run's CPU can be under one clock tick: a figure, maybe 0, and a ratio when both have one)
    assert ws["websocket"]["cpu_ms_per_turn"] >= 0 and ws["http"]["cpu_ms_per_turn"] >= 0
    assert "cpu_per_turn" in ws["ratio_websocket_http"]
    b = ws["resp2chat-b"]
    assert b["websocket"]["lost_events"] == b["http"]["lost_events"] == 0 and "http_cpu_per_turn" in ws["ratio_b_a"]
    long = results["long"]  # issue 22's curve: c=1 sessions of long Codex histories, every path
    assert len(long["sizes"]) == 2
    for size in long["sizes"]:
        for name in ("direct", "passthrough", "passthrough-buffered", "resp2chat", "resp2chat-b"):
            assert size[name]["lost_events"] == 0 and size[name]["failed_answers"] == 0, (name, size[name])
            assert size[name]["ttft_ms"]["n"] == long["turns_per_session"] * long["rounds"]
        assert size["resp2chat"]["cpu_ms_per_turn"] > 0 and size["ratio_cpu_per_turn"]["resp2chat/passthrough"] > 0
        # the gateway's own latency (its metric), within the time to its first token
        for name in ("resp2chat", "resp2chat-b"):
            assert 0 < size[name]["gateway_latency_ms"] < size[name]["ttft_ms"]["p50"], size[name]
            # over mitmproxy holding each body whole (same turns): a figure for every warm turn
            assert size[name]["added_ttft_over_buffered_ms"]["n"] == long["turns_per_session"] * long["rounds"]
    assert "long_cpu_per_turn_vs_passthrough_largest" in results["targets"]
    assert results["targets"]["lost_events"]["met"] is True
    assert "resp2chat" in proc.stdout and "lost events" in proc.stdout  # the table was printed
    assert "WebSocket vs HTTP" in proc.stdout and "Long conversations" in proc.stdout
