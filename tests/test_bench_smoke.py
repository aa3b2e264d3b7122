"""`make bench` in miniature: every path completes with zero lost events and writes its JSON.

No timing assertions: a shared 2-core machine makes wall times noise. codex-relay is measured
when it is installed (`pip install codex-relay`) and skipped otherwise; nothing is installed here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--no-install",
                           "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())

    paths = results["paths"]
    assert {"direct", "passthrough", "resp2chat"} <= set(paths), list(paths)
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
    assert results["targets"]["lost_events"]["met"] is True
    assert "resp2chat" in proc.stdout and "lost events" in proc.stdout  # the table was printed
    assert "WebSocket vs HTTP" in proc.stdout
