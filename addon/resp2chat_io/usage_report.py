"""``resp2chat usage``: turns and tokens per client, day and model, from access logs.

Reads the access log's JSON lines (resp2chat_io/addons/access_log.py): every line is one turn,
however it ended (a line with a ``path``, a refused passthrough call, is not one: left out). The day is the line's ``time`` (UTC); ``client`` names who made the turn (a
line without one, written before the gateway knew its clients or by one without keys, counts
as ``-``). Tokens are the backend's own counts: ``input_tokens`` (prompt), ``cached_tokens`` (of
those, served from the backend's KV cache), ``output_tokens``; where the backends did more than
the client's usage says (the gateway's tool loop ran several rounds, a compaction summary was
written), the line's ``backend_*`` counts, what the metrics and ``tpm`` count too; a turn without
usage (refused, failed before the backend answered) counts as a turn with no tokens.

What is not an access-log line — one cut short by a crash or a rotation, the rest of a stderr
log when ``access_log_path`` is ``-`` — is skipped and counted, never guessed at.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass
from typing import IO, Iterable, Iterator

from resp2chat_io.columns import table

NOBODY = "-"
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}T")
TOKENS = ("input_tokens", "cached_tokens", "output_tokens")


@dataclass
class Totals:
    turns: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0

    def add(self, other: "Totals") -> None:
        self.turns += other.turns
        self.prompt_tokens += other.prompt_tokens
        self.cached_tokens += other.cached_tokens
        self.output_tokens += other.output_tokens


@dataclass
class Report:
    rows: dict[tuple[str, str, str], Totals]  # (client, day, model) -> totals
    skipped: int = 0  # lines that are not access-log records

    def clients(self) -> dict[str, Totals]:
        out: dict[str, Totals] = {}
        for (client, _, _), t in sorted(self.rows.items()):
            out.setdefault(client, Totals()).add(t)
        return out

    def total(self) -> Totals:
        all_ = Totals()
        for t in self.rows.values():
            all_.add(t)
        return all_


NOT_A_TURN = ("", "", "", None)  # an access-log line of a refused request that is not a turn (its "path")


def record(line: bytes) -> tuple[str, str, str, Totals] | None:
    """(client, day, model, this turn's totals) of one access-log line (``NOT_A_TURN``: a line of
    another request, a refused passthrough call); ``None`` for anything else."""
    try:
        data = json.loads(line)
    except ValueError:  # (UnicodeDecodeError too)
        return None
    if not isinstance(data, dict) or not isinstance(data.get("time"), str) or not _DAY.match(data["time"]) \
            or "request_id" not in data:
        return None
    if "path" in data:
        return NOT_A_TURN
    work = any(f"backend_{k}" in data for k in TOKENS)  # (the backends did more than the client's usage)
    counts = [data.get(f"backend_{k}" if work else k) for k in TOKENS]
    if not all(c is None or (isinstance(c, int) and not isinstance(c, bool) and c >= 0) for c in counts):
        return None
    client = data.get("client")
    model = data.get("model")
    return (client if isinstance(client, str) and client else NOBODY, data["time"][:10],
            model if isinstance(model, str) and model else NOBODY, Totals(1, *(c or 0 for c in counts)))


def aggregate(lines: Iterable[bytes], since: str | None = None) -> Report:
    report = Report({})
    for line in lines:
        if not line.strip():
            continue
        found = record(line)
        if found is None:
            report.skipped += 1
            continue
        if found is NOT_A_TURN:
            continue
        client, day, model, totals = found
        if since and day < since:
            continue
        report.rows.setdefault((client, day, model), Totals()).add(totals)
    return report


def read(files: Iterable[str]) -> Iterator[bytes]:
    for name in files:
        if name == "-":
            yield from sys.stdin.buffer
            continue
        with open(name, "rb") as fh:
            yield from fh


def _n(value: int) -> str:
    return f"{value:,}"


def render(report: Report) -> str:
    """The table a person reads: a block per client (its days and models, then its total), the
    total of all clients last."""
    header = ("CLIENT", "DAY", "MODEL", "TURNS", "PROMPT TOKENS", "CACHED", "OUTPUT TOKENS")
    rows: list[tuple] = []
    clients = report.clients()
    for client, totals in clients.items():
        if rows:
            rows.append(("",) * len(header))
        for (c, day, model), t in sorted(report.rows.items()):
            if c == client:
                rows.append((client, day, model, _n(t.turns), _n(t.prompt_tokens), _n(t.cached_tokens), _n(t.output_tokens)))
        rows.append((client, "total", "", _n(totals.turns), _n(totals.prompt_tokens), _n(totals.cached_tokens),
                     _n(totals.output_tokens)))
    if len(clients) > 1:
        t = report.total()
        rows += [("",) * len(header), ("all clients", "total", "", _n(t.turns), _n(t.prompt_tokens),
                                       _n(t.cached_tokens), _n(t.output_tokens))]
    return table(header, rows, right=(3, 4, 5, 6))


def as_json(report: Report, since: str | None, files: list[str]) -> dict:
    return {
        "since": since, "files": files, "skipped_lines": report.skipped,
        "rows": [{"client": c, "day": d, "model": m, **asdict(t)} for (c, d, m), t in sorted(report.rows.items())],
        "clients": {c: asdict(t) for c, t in report.clients().items()},
        "total": asdict(report.total()),
    }


def main(files: list[str], since: str | None = None, as_machine: bool = False, out: IO[str] = sys.stdout) -> int:
    try:
        report = aggregate(read(files), since)
    except OSError as exc:
        print(f"resp2chat: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    if as_machine:
        out.write(json.dumps(as_json(report, since, files), indent=2) + "\n")
    elif report.rows:
        out.write(render(report))
    else:
        print("resp2chat: no turns" + (f" since {since}" if since else "") + f" in {', '.join(files)}", file=sys.stderr)
    if report.skipped and not as_machine:
        print(f"resp2chat: skipped {report.skipped} line{'s' if report.skipped != 1 else ''} that "
              f"{'are not access-log records' if report.skipped != 1 else 'is not an access-log record'} (cut short, or "
              "other output)",
              file=sys.stderr)
    return 0
