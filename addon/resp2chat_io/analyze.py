"""`resp2chat analyze FILE…`: prefix-cache analysis of recorded flows or an upstream JSONL log."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from resp2chat_core.prefix import analyze
from resp2chat_core.routing import CHAT_PATH
from resp2chat_io import META
from resp2chat_core.turn import session_key


def _session_of(meta: dict, headers) -> str:
    try:
        original = json.loads(meta.get("responses_request") or "{}")
    except (ValueError, TypeError):  # (not JSON, or not text: an edited record)
        original = {}
    return session_key(original.get("prompt_cache_key") if isinstance(original, dict) else None, headers) or "default"


def read_flows(path: Path) -> list[tuple[float, str, dict]]:
    """The chat requests of a flow file's turns. A file cut short (a gateway stopped while writing
    it) is read up to the cut, with a warning that says where (flowfile.py); one of which no flow
    reads is named and refused; a turn whose record is not what the gateway writes (edited by
    hand) is left out."""
    from mitmproxy import exceptions, http

    from . import flowfile

    out = []
    try:
        flows, cut = flowfile.read(str(path))
    except (OSError, exceptions.FlowReadException) as exc:
        raise SystemExit(f"resp2chat analyze: {path}: cannot read: {exc}") from None
    if cut is not None:
        print(f"resp2chat analyze: warning: {cut}", file=sys.stderr)
    for f in flows:
        meta = f.metadata.get(META) if isinstance(f, http.HTTPFlow) else None
        meta = meta if isinstance(meta, dict) else {}
        if meta.get("transport") == "websocket":  # a Responses WebSocket: its turns' chat requests
            turns = meta.get("turns")
            for n, turn in enumerate(turns if isinstance(turns, list) else ()):
                chat = _chat(turn.get("chat_request")) if isinstance(turn, dict) and not turn.get("warmup") else None
                if chat is not None:  # (a warm-up never reached it)
                    out.append((f.request.timestamp_start + n * 1e-6,
                                _session_of({"responses_request": turn.get("responses_request")}, f.request.headers),
                                chat, turn.get("usage")))
            continue
        if not isinstance(f, http.HTTPFlow) or not f.request.path.split("?")[0].endswith(CHAT_PATH):
            continue
        chat = _chat(f.request.content or b"")
        if chat is not None:
            out.append((f.request.timestamp_start, _session_of(meta, f.request.headers), chat, meta.get("usage")))
    return out


def _chat(text) -> dict | None:
    """A recorded chat request (its JSON text) as the analysis reads it; None: it is none."""
    try:
        chat = json.loads(text) if isinstance(text, (str, bytes)) else None
    except ValueError:
        return None
    return chat if isinstance(chat, dict) and isinstance(chat.get("messages"), list) else None


def read_jsonl(path: Path) -> list[tuple[float, str, dict]]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise SystemExit(f"resp2chat analyze: {path}:{n}: not JSON") from None
        body = rec.get("body", rec)
        out.append((rec.get("ts", n), rec.get("session") or "default", body, None))
    return out


def load(paths: list[str]) -> list[tuple]:
    records = []
    for p in map(Path, paths):
        if not p.exists():
            raise SystemExit(f"resp2chat analyze: {p}: no such file")
        with p.open("rb") as fh:
            head = fh.read(1)
        records += read_jsonl(p) if head == b"{" else read_flows(p)
    records.sort(key=lambda r: r[0])
    return [rest for _, *rest in records]


def _pct(value) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def render_table(report) -> str:
    sessions = {}
    lines = [f"{'#':>3} {'session':<10} {'turn':>4} {'KB':>7} {'tokens':>7} {'prefix/prev':>12} {'radix hit':>10}"
             f" {'server cached':>14}  first divergence"]
    for r in report.rows:
        short = sessions.setdefault(r.session, f"s{len(sessions) + 1}")
        prev = "-" if r.prev_prefix_tokens is None else f"{r.prev_prefix_tokens}/{r.prev_tokens}"
        radix = f"{r.radix_cached_tokens / r.tokens * 100:.1f}%" if r.tokens else "-"
        div = ""
        if r.divergence:
            d = r.divergence
            div = f"{d['segment']} +{d['offset']}: was {d['previous']!r} now {d['current']!r}"
        server = f"{r.server_cached_tokens}/{r.server_prompt_tokens}" if r.server_prompt_tokens else "-"
        lines.append(f"{r.index:>3} {short:<10} {r.turn:>4} {r.size / 1024:>7.1f} {r.tokens:>7} {prev:>12} {radix:>10}"
                     f" {server:>14}  {div}")
    s = report.summary()
    lines += [
        "",
        f"{s['requests']} requests in {s['sessions']} session(s); {s['prompt_tokens']} prompt tokens "
        f"({s['token_estimate']})",
        f"turns after the first: session prefix hit {_pct(s['session_prefix_hit_ratio_later_turns'])}, "
        f"simulated radix cache hit {_pct(s['radix_hit_ratio_later_turns'])}",
        f"all requests: simulated radix cache hit {_pct(s['radix_hit_ratio_all'])}",
        f"turns after the first, as the backend reported (usage cached_tokens): {_pct(s['server_cached_ratio_later_turns'])}",
    ]
    if len(sessions) > 1:
        lines.append("sessions: " + ", ".join(f"{v}={k}" for k, v in sessions.items()))
    return "\n".join(lines)


def main(args) -> int:
    report = analyze(load(args.files))
    if args.json:
        json.dump({"summary": report.summary(), "requests": [r.as_dict() for r in report.rows]},
                  sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print(render_table(report))
    return 0
