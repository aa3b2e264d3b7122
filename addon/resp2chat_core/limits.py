"""A client's limits (``rpm``, ``tpm``, ``max_streams``): the rule, the answer, the headers.

Rules of this file:
- Sans-I/O: the time comes in as an argument; where the state lives (this process, or Redis for
  every replica: resp2chat_io/addons/limits.py runs the same rule in a Lua script) is not its
  business.
- ``rpm`` and ``tpm`` are token buckets, as OpenAI's limits are: a bucket holds up to the limit
  and refills continuously at the limit per minute. A turn (or another request that makes a
  backend work: a passthrough such as embeddings, input_tokens; its tokens: ``Meter``, the
  answer's own usage; a Responses WebSocket's warm-up: no backend, but the socket remembers it)
  takes one request token when it is admitted; its backend tokens (prompt + output, the
  backend's own usage) are taken from the token bucket when it ends, which may drive it below
  zero. A turn is admitted while the request bucket holds a whole token and the token bucket
  holds more than nothing, and while the client has fewer than ``max_streams`` turns open.
- Refused: ``429`` with ``code: rate_limit_exceeded``, ``Retry-After`` (and ``retry-after-ms``)
  saying when every bucket in the way has refilled enough (``why`` names the first), and
  OpenAI's headers. Every turn's answer carries ``x-ratelimit-limit-*``,
  ``x-ratelimit-remaining-*`` and ``x-ratelimit-reset-*`` (``requests`` and ``tokens``; only
  for a limit the client has), so the openai SDK and Codex back off as they do against OpenAI.
- ``retry_headers`` is the one way the gateway writes when to try again (``retry-after`` and
  ``retry-after-ms``): its own 429s, and a backend's ``Retry-After`` passed on to a JSON client
  (``backend_retry_after`` reads that, in seconds or as a date). Where no HTTP header can say it
  (a stream whose head has gone, a WebSocket), the same headers go inside the error, as Codex
  reads them there (``error.headers`` of ``response.failed``, ``headers`` of a socket's
  ``error``), and the message ends in OpenAI's words, ``retry_phrase`` ("Please try again in
  1.5s."): Codex reads a rate limit's wait from them.
"""

from __future__ import annotations

import email.utils
import json
import math
from dataclasses import dataclass

from . import usage
from .errors import GatewayError

WINDOW = 60.0  # seconds: rpm and tpm refill over a minute
STREAMS_RETRY = 1.0  # seconds: the wait told a client at its max_streams (``verdict``: a poll, not a promise)


@dataclass
class Bucket:
    """A token bucket: ``level`` tokens at time ``at``; up to ``capacity``, refilling at
    ``capacity`` per ``WINDOW`` seconds."""

    capacity: int
    level: float
    at: float

    @classmethod
    def full(cls, capacity: int, now: float) -> "Bucket":
        return cls(capacity, float(capacity), now)

    def refill(self, now: float) -> float:
        self.level = min(float(self.capacity), self.level + max(0.0, now - self.at) * self.capacity / WINDOW)
        self.at = now
        return self.level

    def wait(self, need: float) -> float:
        """Seconds until the level reaches ``need`` (0: it has)."""
        return max(0.0, (need - self.level) * WINDOW / self.capacity)

    def reset(self) -> float:
        """Seconds until it is full again."""
        return max(0.0, (self.capacity - self.level) * WINDOW / self.capacity)


@dataclass(frozen=True)
class Verdict:
    """What the limits said about a turn: admitted or not, and the figures for its headers."""

    admitted: bool
    headers: tuple[tuple[str, str], ...] = ()
    retry_after: float = 0.0  # seconds, when refused
    why: str = ""  # "requests" | "tokens" | "streams": the limit in the way, when refused

    def error(self, client: str) -> GatewayError:
        what = {"requests": "requests per minute (rpm)", "tokens": "tokens per minute (tpm)",
                "streams": "requests open at once (max_streams)"}[self.why]
        return GatewayError(f"rate limit reached for client {client!r}: {what}. "
                            + retry_phrase(math.ceil(self.retry_after)),
                            code="rate_limit_exceeded", status=429, type=self.why, retry_after=self.retry_after)


def retry_headers(seconds: float) -> tuple[tuple[str, str], ...]:
    """The headers that tell a client when to try again, as the openai SDK reads them (Codex as
    well): ``retry-after`` (whole seconds, rounded up) and ``retry-after-ms``. The one way the
    gateway writes them: its refusals that know a wait (``GatewayError.retry_after``: base.refusal,
    a socket's error event), a backend's wait passed on (http_turns.py, a stream's error)."""
    wait = max(seconds, 0.001)
    return ("retry-after", str(math.ceil(wait))), ("retry-after-ms", str(math.ceil(wait * 1000)))


MAX_TOLD_WAIT = 60.0  # seconds: the longest wait a stream's error tells its client to sit out (``retry_headers``)


def retry_phrase(seconds: float) -> str:
    """A wait as OpenAI's error messages say it ("Please try again in 1.898s.", "… in 20ms."):
    Codex reads a ``rate_limit_exceeded``'s wait from "try again in" and a number of s, ms or
    seconds, so never an exponent or minutes."""
    if seconds < 1:
        return f"Please try again in {math.ceil(max(seconds, 0.0) * 1000)}ms."
    return f"Please try again in {f'{seconds:.3f}'.rstrip('0').rstrip('.')}s."


def retry_seconds(value: str | None) -> float | None:
    """A backend's ``Retry-After`` (seconds: ``2``, or ``1.5`` as some send it) as seconds; None
    when there is none or it is not a number of seconds (``backend_retry_after``)."""
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds < 1e9 else None


def backend_retry_after(value: str | None, now: float) -> str | None:
    """A backend's ``Retry-After`` header as the relay passes it on (``UpstreamFailed``): its
    seconds as it wrote them, an HTTP date (RFC 9110's other form) as the whole seconds from
    ``now`` until then; None for anything else."""
    value = (value or "").strip()
    if retry_seconds(value) is not None:
        return value
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return str(max(0, math.ceil(when - now)))


def duration(seconds: float) -> str:
    """A duration as OpenAI writes it in ``x-ratelimit-reset-*``: ``20ms``, ``6s``, ``1m30s``
    (none: ``0s``, a bucket already full)."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def headers(rpm: int | None, requests: Bucket | None, tpm: int | None, tokens: Bucket | None) -> tuple:
    """OpenAI's rate-limit headers for the limits a client has."""
    out = []
    if rpm is not None and requests is not None:
        out += [("x-ratelimit-limit-requests", str(rpm)),
                ("x-ratelimit-remaining-requests", str(max(0, math.floor(requests.level)))),
                ("x-ratelimit-reset-requests", duration(requests.reset()))]
    if tpm is not None and tokens is not None:
        out += [("x-ratelimit-limit-tokens", str(tpm)),
                ("x-ratelimit-remaining-tokens", str(max(0, math.floor(tokens.level)))),
                ("x-ratelimit-reset-tokens", duration(tokens.reset()))]
    return tuple(out)


def decide(now: float, rpm: int | None, requests: Bucket | None, tpm: int | None, tokens: Bucket | None,
           open_streams: int, max_streams: int | None) -> Verdict:
    """Admit a turn or not (``requests`` loses a token when it is admitted). The buckets are
    refilled to ``now`` first; ``open_streams``: the client's turns open now (this one not yet)."""
    if requests is not None:
        requests.refill(now)
    if tokens is not None:
        tokens.refill(now)
    why = ("requests" if requests is not None and requests.level < 1
           else "tokens" if tokens is not None and tokens.level <= 0
           else "streams" if max_streams is not None and open_streams >= max_streams else "")
    if not why and requests is not None:
        requests.level -= 1
    return verdict(why, rpm, requests, tpm, tokens)


def verdict(why: str, rpm: int | None, requests: Bucket | None, tpm: int | None, tokens: Bucket | None) -> Verdict:
    """The verdict once decided (``why``: the limit in the way, "" when admitted), from the
    buckets as they are after it: here, or in Redis (resp2chat_io/addons/limits.py)."""
    heads = headers(rpm, requests, tpm, tokens)
    if not why:
        return Verdict(True, heads)
    if why == "streams":
        # A slot comes back when one of the client's open turns ends, which nothing here can
        # foresee (a stream's length is the model's; a turn may be on another replica): no wait is
        # true, so the client is told to look again in a second, a polling interval (the openai
        # SDK retries, twice by default, then shows the 429; Codex reads "try again in 1s").
        # The buckets are not in the way (they are asked first): the wait is never theirs.
        return Verdict(False, heads, STREAMS_RETRY, why)
    # until every bucket in the way has refilled enough, not only the first: a client that waits
    # ``Retry-After`` is not refused again by the other one
    waits = [requests.wait(1) if requests is not None and requests.level < 1 else 0.0,
             max(tokens.wait(1e-9), 0.001) if tokens is not None and tokens.level <= 0 else 0.0]
    return Verdict(False, heads, max(waits), why)


def spend(now: float, tokens: Bucket, used: int) -> None:
    """A turn's backend tokens, taken from the client's token bucket when it ends."""
    tokens.refill(now)
    tokens.level -= used


# --- what a request the backend answers directly spent ------------------------------------------

KEPT = 4096  # bytes of an answer's start and end a ``Meter`` keeps (usage is at one end)


class Meter:
    """The backend tokens in an answer that passes through in pieces (mitmproxy's stream
    callable: a passthrough such as ``POST /v1/embeddings``): its JSON ``usage`` (OpenAI's and
    every backend's put it last: a JSON body's last key, a stream's last chunk), read from the
    first and last ``KEPT`` bytes kept of it, never the whole answer. Passes every piece on as
    it is; ``used`` is None while no usage has been seen (an answer without one, or one that
    has not ended)."""

    __slots__ = ("head", "tail")

    def __init__(self) -> None:
        self.head = self.tail = b""

    def __call__(self, data: bytes) -> bytes:
        if len(self.head) < KEPT:
            self.head += data[:KEPT - len(self.head)]
        self.tail = (self.tail + data[-KEPT:])[-KEPT:]  # (a large piece is not copied whole)
        return data

    @property
    def used(self) -> int | None:
        for kept in (self.tail, self.head):
            found = _last_usage(kept)
            if found is not None:
                return found
        return None


_decode = json.JSONDecoder().raw_decode


def _last_usage(kept: bytes) -> int | None:
    """The tokens of the last whole ``"usage": {...}`` in ``kept`` (a key, not inside a string:
    a string's quotes are escaped)."""
    text = kept.decode("utf-8", "replace")
    at = len(text)
    while (at := text.rfind('"usage"', 0, at)) >= 0:
        if at == 0 or text[at - 1] != "\\":
            rest = text[at + 7:].lstrip()
            if rest.startswith(":"):
                try:
                    found = usage.tokens(_decode(rest[1:].lstrip())[0])
                except ValueError:
                    found = None
                if found is not None:
                    return found
    return None
