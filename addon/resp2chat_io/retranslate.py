"""``resp2chat retranslate FILE…``: every recorded turn lowered and translated again by the
current code and compared with the recording (resp2chat_core/retranslate.py says how).

Exit status: 0 when every turn that could be checked came out the same, 1 when one differs
(the differences are printed as unified diffs), 2 when a file cannot be read.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

from resp2chat_core.retranslate import History, Result, check_turn, turns_of
from resp2chat_core.seal import Sealer
from resp2chat_io import META


def _sealer(given: str | None) -> Sealer | None:
    """The key that sealed the recording's items: --seal-key, else the configured one, else this
    install's key file if there is one (never a new one)."""
    from resp2chat_io import keys
    from resp2chat_io.config import load_settings

    configured = given
    if not configured:
        try:
            configured = load_settings().values["seal_key"]
        except Exception:  # noqa: BLE001 — a broken config file only means: no configured key
            configured = ""
    if configured or keys.key_path().exists():
        return Sealer(functools.cache(lambda: keys.seal_key(configured)))  # read once, when first needed
    return None


def check_file(path: Path, sealer: Sealer | None) -> list[Result]:
    from mitmproxy import http

    from . import flowfile

    read, cut = flowfile.read(str(path))
    if cut is not None:  # (a recording cut short: the turns before the cut are checked)
        print(f"warning: {cut}", file=sys.stderr)
    flows = [f for f in read if isinstance(f, http.HTTPFlow)]
    results: list[Result] = []
    stored = History()  # previous_response_id over HTTP: the responses this file holds
    for number, flow in enumerate(flows, 1):
        meta = flow.metadata.get(META) or {}
        response = flow.response.content if flow.response is not None else None
        stream = flow.response is not None and flow.response.headers.get("content-type", "").startswith("text/event-stream")
        history = History() if meta.get("transport") == "websocket" else stored  # a socket remembers its own
        for name, record, answer, streamed in turns_of(meta, response, stream):
            if answer is not None and not record.get("chat_request"):  # an HTTP turn: the flow's request
                # (unless a fallback answered: the flow shows what it got, the record the first's)
                record = {**record, "chat_request": (flow.request.content or b"").decode("utf-8", "replace")}
            if answer is not None and "request_id" not in record:  # an HTTP turn's: its answer's header
                record = {**record, "request_id": flow.response.headers.get("x-request-id", "")}
            where = f"flow {number} ({flow.request.method} {flow.request.path}) {name}"
            results.append(check_turn(where, record, history, sealer, answer=answer, stream=streamed))
    return results


def main(args) -> int:
    sealer = _sealer(args.seal_key)
    status = 0
    for name in args.files:
        path = Path(name)
        try:
            results = check_file(path, sealer)
        except Exception as exc:  # noqa: BLE001 — not a flow file, unreadable…
            print(f"{path}: cannot read: {type(exc).__name__}: {exc}", file=sys.stderr)
            status = 2
            continue
        same = [r for r in results if r.outcome == "same"]
        differs = [r for r in results if r.outcome == "differs"]
        skipped = [r for r in results if r.outcome == "skipped"]
        print(f"{path}: {len(results)} turns: {len(same)} the same ({sum(r.events for r in same)} events), "
              f"{len(differs)} differ, {len(skipped)} skipped")
        for r in results:
            if r.outcome != "same" or args.verbose:
                print(f"  {r.where}: {r.outcome}" + (f" ({r.events} events)" if r.outcome == "same" else ""))
                for line in r.details if r.outcome == "differs" or args.verbose else r.details[:1]:
                    print(f"    {line}")
        if args.json:
            print(json.dumps([r.__dict__ for r in results], ensure_ascii=False))
        if differs and status == 0:
            status = 1
    return status
