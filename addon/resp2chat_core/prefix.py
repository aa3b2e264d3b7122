"""KV prefix-cache analysis of chat requests: how much of each prompt a backend could reuse.

A backend with prefix caching (vLLM's automatic prefix caching, sglang's radix attention,
llama.cpp's prompt cache) skips the prompt tokens it has already computed for an identical
prefix. So the figure that matters is the longest common prefix of what the backend tokenizes.

Token counting: the prompt is approximated by a canonical rendering — the tools (templates put
them at the start of the system prompt), then every message, each as compact JSON with sorted
keys — and **1 token = 4 bytes** of it (usage.py ``estimate`` for totals; a cached prefix counts
only its whole tokens, rounded down: a token a break cuts is not reused). This is
not a tokenizer, but a diverging byte is a diverging token, so *where* prefixes break and the
ratios are what a real tokenizer would show, to a few tokens per break.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field

from .usage import BYTES_PER_TOKEN, estimate


def _c(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class Prompt:
    """A chat request rendered canonically, with the byte offset where each segment starts."""

    data: bytes
    starts: list[int]  # segment i starts at starts[i]; segment 0 is the tools
    labels: list[str]  # "tools", "messages[0] (system)", …

    @classmethod
    def from_chat(cls, chat: dict) -> "Prompt":
        parts, labels = [_c(chat.get("tools") or [])], ["tools"]
        for i, m in enumerate(chat.get("messages") or ()):
            parts.append(_c(m))
            labels.append(f"messages[{i}] ({m.get('role', '?') if isinstance(m, dict) else '?'})")
        starts, pos = [], 0
        for p in parts:
            starts.append(pos)
            pos += len(p)
        return cls(b"".join(parts), starts, labels)

    @property
    def tokens(self) -> int:
        return estimate(len(self.data))

    def locate(self, offset: int) -> tuple[str, int]:
        """(segment label, offset inside it) of a byte offset."""
        i = max(bisect.bisect_right(self.starts, offset) - 1, 0)
        return self.labels[i], offset - self.starts[i]


def common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    lo, hi = 0, n
    # binary search on slice equality: memcmp speed instead of a Python loop per byte
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _excerpt(data: bytes, offset: int, width: int = 40) -> str:
    return data[offset:offset + width].decode("utf-8", "replace")


@dataclass
class Row:
    index: int
    session: str
    turn: int  # 1-based within its session
    size: int  # bytes of canonical prompt
    tokens: int
    prev_prefix_tokens: int | None  # common prefix with the previous request of the session
    prev_tokens: int | None
    radix_cached_tokens: int  # longest prefix shared with any earlier request
    divergence: dict | None = None  # where this prompt stops extending the previous one
    server_prompt_tokens: int | None = None  # what the backend reported, when recorded
    server_cached_tokens: int | None = None

    def as_dict(self) -> dict:
        return self.__dict__.copy()


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    def _sum(self, rows, attr) -> int:
        return sum(getattr(r, attr) or 0 for r in rows)

    @property
    def later_turns(self) -> list[Row]:
        return [r for r in self.rows if r.turn > 1]

    @property
    def radix_hit_ratio(self) -> float | None:
        rows = self.later_turns
        total = self._sum(rows, "tokens")
        return self._sum(rows, "radix_cached_tokens") / total if total else None

    @property
    def session_hit_ratio(self) -> float | None:
        rows = self.later_turns
        total = self._sum(rows, "tokens")
        return self._sum(rows, "prev_prefix_tokens") / total if total else None

    @property
    def server_hit_ratio(self) -> float | None:
        """The backend's own figure (usage cached_tokens / prompt tokens), turns after the first."""
        rows = [r for r in self.later_turns if r.server_prompt_tokens]
        total = self._sum(rows, "server_prompt_tokens")
        return self._sum(rows, "server_cached_tokens") / total if total else None

    @property
    def overall_radix_hit_ratio(self) -> float | None:
        total = self._sum(self.rows, "tokens")
        return self._sum(self.rows, "radix_cached_tokens") / total if total else None

    def summary(self) -> dict:
        return {
            "requests": len(self.rows),
            "sessions": len({r.session for r in self.rows}),
            "prompt_tokens": self._sum(self.rows, "tokens"),
            "later_turn_tokens": self._sum(self.later_turns, "tokens"),
            "session_prefix_hit_ratio_later_turns": self.session_hit_ratio,
            "radix_hit_ratio_later_turns": self.radix_hit_ratio,
            "radix_hit_ratio_all": self.overall_radix_hit_ratio,
            "server_cached_ratio_later_turns": self.server_hit_ratio,
            "token_estimate": f"1 token = {BYTES_PER_TOKEN} bytes of canonical JSON (tools, then messages)",
        }


def analyze(requests: list[tuple]) -> Report:
    """``requests``: (session key, chat request body[, Responses usage]) in the order sent."""
    report = Report()
    last: dict[str, Prompt] = {}
    turns: dict[str, int] = {}
    seen: list[bytes] = []  # every earlier prompt, sorted: the radix cache's contents
    for i, (session, chat, *rest) in enumerate(requests):
        p = Prompt.from_chat(chat)
        turns[session] = turns.get(session, 0) + 1
        # The longest prefix shared with any earlier prompt is shared with a sorted neighbour.
        pos = bisect.bisect_left(seen, p.data)
        best = max((common_prefix(p.data, seen[j]) for j in (pos - 1, pos) if 0 <= j < len(seen)), default=0)
        row = Row(i, session, turns[session], len(p.data), p.tokens, None, None, best // BYTES_PER_TOKEN)
        prev = last.get(session)
        if prev is not None:
            lcp = common_prefix(p.data, prev.data)
            row.prev_prefix_tokens, row.prev_tokens = lcp // BYTES_PER_TOKEN, prev.tokens
            if lcp < len(prev.data):  # the new prompt does not extend the previous one
                where, offset = p.locate(lcp)
                row.divergence = {
                    "segment": where, "offset": offset, "byte": lcp,
                    "previous": _excerpt(prev.data, lcp), "current": _excerpt(p.data, lcp),
                }
        usage = rest[0] if rest else None
        if isinstance(usage, dict) and usage.get("input_tokens"):
            row.server_prompt_tokens = usage["input_tokens"]
            row.server_cached_tokens = (usage.get("input_tokens_details") or {}).get("cached_tokens", 0)
        bisect.insort(seen, p.data)
        last[session] = p
        report.rows.append(row)
    return report
