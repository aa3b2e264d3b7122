"""Several upstreams: which ones serve a model, in which order, and when to try the next.

Rules of this file:
- The ``upstreams`` setting is an ordered list. A model goes to the *first* upstream whose
  ``models`` globs match the client's model name; every later match is a fallback, tried in
  order when the one before failed **before its first byte**: it could not be reached (or
  answered with no HTTP), it ended its stream before any data, it answered 5xx or 429 (a
  gateway-observed silence is a 504), it found the conversation too long for its context
  (``context_length_exceeded``: a 400 "maximum context length"…; the next upstream may have a
  larger window), or it refused the gateway's key (a 401/403: errors.py ``KEY_REFUSED``; the
  next upstream has its own). Never after anything of an answer reached the client, and never
  for another 4xx (the request itself is wrong; the next upstream would say the same; so is a
  refusal of the client's own key, ``forward_client_auth``: it is part of the request). A call
  the gateway reads whole and passes nothing of (a compaction summary: server-side compaction's,
  a compaction turn's; relay/exchange.py) fails before anything reached the client at any point
  of it: it falls back on such a failure midway too (the same rule, ``falls_back``).
- Each entry may carry the per-backend settings (settings.py ``PER_UPSTREAM``, same names): an
  upstream's own value wins over the top-level one, so each candidate gets its own
  byte-deterministic chat body, timeouts and extra headers. The entry itself and its parsing
  are settings.py's (``UpstreamSpec``); invalid entries stop start-up naming the entry and field.
- A turn's upstreams are one tuple of ``Candidate`` objects, in the order they are tried.

Theory of operation
-------------------
The relay runs one candidate at a time through an ``Attempt``, a stand-in for the turn's
``Channel`` (channel.py): backend data and most events pass straight through, but an
``UpstreamFailed`` that arrives before anything was passed is held back. If the failure falls
back and another candidate remains, nothing of it ever reaches the turn; the next candidate
gets a fresh ``Attempt``. ``Keepalive`` events pass without committing (they are the gateway's
own words to a waiting client, not part of an answer). A call that passes nothing on (the
compaction summary, read whole by the gateway: its stream and a whole JSON answer through the
call's reader, relay/upstream.py ``Reader``) never commits by itself: once it answered, the relay commits it
(``release``), so its ``Rerouted`` still goes before anything else. When every candidate failed,
one ``UpstreamFailed`` names them all (``all_failed``), with the shortest ``Retry-After`` any gave
(none when a backend answered without one: it may be ready at once), and the status and code of
the failure that tells the client best what to do next (``deciding``, by ``KINDS``): not the last
one's, which is a matter of the order the operator listed them in.

Which failure decides (``KINDS``, first kind found wins; within a kind, the first upstream's, the
one a retry asks first):

    =============  =======================================  ==========================================
    kind           failures                                 what the client does with it
    =============  =======================================  ==========================================
    rate_limited   429 (not ``insufficient_quota``)         waits (``Retry-After``) and retries: the
                                                            openai SDK, Codex, LiteLLM's router (its
                                                            cooldown) all retry a 429
    down           5xx, unreachable (the relay's 502),      retries with its own backoff (the openai
                   silent (504)                             SDK retries every 5xx, Codex too)
    too_long       ``context_length_exceeded``              compacts, or stops (Codex): a retry of the
                                                            same conversation would fail again
    out_of_quota   429 ``insufficient_quota``               stops (Codex: "quota exceeded"): billing
    refused_key    401/403: the backend refused the         retries (``server_error``; HTTP 502), the
                   gateway's key (``KEY_REFUSED``)          message telling the operator to fix it
    =============  =======================================  ==========================================

A failure a retry of the same request may cure beats one it cannot: a conversation too long for
one upstream and another that is down is retried (the larger window may be back; compacting loses
the conversation's detail for good), and a quota that ran out on one upstream hides no other's
outage. A refused key comes last: nothing the client does cures it (only the operator), and what
any other upstream said may (a compacted conversation fits the short one) or at least says
truly why that one failed; whichever decides, every upstream is named with its reason. A rate
limit beats an outage: it is the failure that says it passes (and when), what a client's
back-off is made for. A failure that does not fall back (another 4xx: the request is
wrong there) is never one of them: it ends the walk and reaches the client as it is (relay/
exchange.py ``_walk``), what failed before it named nowhere: the same request would fail so again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

from . import settings as S
from .channel import Channel, Event, Keepalive, UpstreamFailed
from .errors import KEY_REFUSED, GatewayError, upstream_failure
from .limits import retry_seconds

CHAT_PATH = "/chat/completions"  # below an upstream's base URL: where its turns go
TOO_LONG = "context_length_exceeded"  # the code of a conversation past a backend's context (errors.py)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One upstream a turn may be answered by, with everything the relay needs to call it: from
    the gateway's configuration (URL, key, headers, timeouts) and the turn's own lowering for
    it (body, how its ``<think>`` tags are read). A turn's candidates are one tuple in the order
    they are tried (``Exchange.candidates``): index 0 is the first, the rest its fallbacks."""

    name: str  # the upstream's name ("default" with one upstream)
    url: str  # its chat completions URL
    body: bytes  # the chat request it gets
    think: str = "auto"  # how its <think> tags are read (think.py)
    authorization: bytes | None = None  # its Authorization header value (None: none is sent)
    headers: tuple[tuple[bytes, bytes], ...] = ()  # its upstream_headers, lower-case names
    connect_timeout: float | None = 10.0  # seconds (None: no limit)
    idle_timeout: float = 60.0  # seconds of upstream silence before the turn fails (inf: no limit)
    data_timeout: float = 300.0  # seconds without stream data (SSE comments are none) before it fails (inf: none)
    keepalive: float = 15.0  # seconds without data before the first between keepalive events (inf: off)
    # its authorization is the client's own, given or not (forward_client_auth: the gateway has no
    # key for it), so a 401/403 refused the client's credentials, not the gateway's (errors.py KEY_REFUSED)
    forwarded: bool = False

    def sent(self, common: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The headers this upstream gets: ``common`` (what every candidate gets: the client's
        forwarded headers, affinity), then its own ``upstream_headers`` and key, which a header
        of the same name in ``common`` never goes beside (a client's ``api-key`` or provider
        order is not sent ahead of the operator's, where a backend would read the first). The
        one way an upstream's headers are made: a turn's, and a passthrough call's or the
        merged model list's (addons/upstreams.py ``authorize``, ``merged_models``)."""
        own = [*self.headers, *([(b"authorization", self.authorization)] if self.authorization else [])]
        names = {name for name, _ in own}
        return [(n, v) for n, v in common if n not in names] + own

    @property
    def base_url(self) -> str:
        """Its base URL (``url`` without ``CHAT_PATH``): what a record calls its ``upstream``."""
        return self.url.removesuffix(CHAT_PATH)

    def __repr__(self) -> str:  # never the key
        return f"Candidate({self.name!r}, {self.url!r})"


def timeouts(values: dict) -> dict:
    """A ``Candidate``'s timeouts from (an upstream's) settings, settings.py names: 0 is no limit."""
    return {"connect_timeout": values["connect_timeout_secs"] or None,
            "idle_timeout": values["upstream_idle_timeout_secs"] or float("inf"),
            "data_timeout": values["upstream_data_timeout_secs"] or float("inf"),
            "keepalive": values["keepalive_secs"] or float("inf")}


def header_pairs(headers: dict) -> tuple[tuple[bytes, bytes], ...]:
    """``upstream_headers`` as the relay sends them (lower-case names, in the setting's order)."""
    return tuple((k.lower().encode(), v.encode()) for k, v in headers.items())


def candidates(specs: Sequence[S.UpstreamSpec], model: str) -> tuple[S.UpstreamSpec, ...]:
    """The upstreams that serve ``model``, in order (the first answers, the rest fall back);
    ``GatewayError`` (404 ``model_not_found``) when none does."""
    found = tuple(s for s in specs if s.serves(model))
    if not found:
        raise GatewayError(f"no upstream serves model {model!r} (configured: "
                           + "; ".join(f"{s.name}: {', '.join(s.models)}" for s in specs) + ")",
                           param="model", code="model_not_found", status=404)
    return found


def falls_back(failure: UpstreamFailed) -> bool:
    """Worth trying the next upstream: unreachable (the relay's 502), silent (504), 5xx, 429, a
    conversation too long for the backend's context (``context_length_exceeded``, a 400 or its
    error object, errors.py ``classify_upstream_error``): the next upstream may hold more (a
    compaction summary asks for the whole conversation and the prompt besides), and the gateway's
    key refused (``KEY_REFUSED``, a 401/403): the next upstream is sent its own. When none is
    left the client gets the code (``all_failed``: every upstream too short, the 400), which Codex
    acts on (it stops, or compacts)."""
    return (failure.status >= 500 or failure.status == 429
            or _code(failure) in (TOO_LONG, KEY_REFUSED))


def _code(failure: UpstreamFailed) -> str:
    """A failure's Responses code (errors.py ``upstream_failure``)."""
    return upstream_failure(failure.status, failure.body, own=failure.own, forwarded=failure.forwarded)[0]


CURABLE = ("rate_limited", "down")  # the kinds a retry of the same request may cure: the only ones whose wait counts
KINDS = ("rate_limited", "down", "too_long", "out_of_quota", "refused_key")  # the order a kind decides in (module docstring)


def kind(failure: UpstreamFailed) -> str:
    """Which of ``KINDS`` a failure that falls back is (``falls_back``), by its Responses code
    (errors.py ``upstream_failure``: the backend's own code or words, the relay's for its own
    failures) and its status; "other" for one that does not fall back."""
    code = _code(failure)
    if code == KEY_REFUSED:  # (a 401/403; or the gateway's 502 that stands for one: a compaction summary's)
        return "refused_key"
    if code == TOO_LONG:
        return "too_long"
    if code == "insufficient_quota":
        return "out_of_quota"
    if failure.status == 429:
        return "rate_limited"
    return "down" if failure.status >= 500 else "other"


def deciding(failures: Sequence[UpstreamFailed]) -> UpstreamFailed:
    """The failure whose status and code a client gets when every upstream failed (``failures``,
    in the order they were tried): the first of the earliest kind in ``KINDS`` (module
    docstring); the first failure when none is of one."""
    rank = {k: i for i, k in enumerate(KINDS)}
    return min(failures, key=lambda f: rank.get(kind(f), len(KINDS)))


def all_failed(model: str, tried: Sequence[tuple[str, UpstreamFailed]]) -> UpstreamFailed:
    """One failure naming every upstream tried (and why), with the status and code of the one
    that tells the client best what to do next (``deciding``: a rate limit, else an outage, else a
    conversation too long, else a quota, else a refused key), and the shortest wait any of them
    asked for (``Retry-After``): a client's retry goes through every upstream again, so it may be
    answered as soon as the first of them is ready; the longest would keep it waiting for the
    slowest, the last one's is a matter of order. A backend that
    answered without a wait (a plain 503/504, a 429 without the header) may be ready at once:
    then none is told, and the client backs off as it does by itself (Codex, the openai SDK:
    well under a second at first), rather than sitting out another upstream's 30 s. What the
    relay saw itself (``own``: unreachable, silent) says nothing of when: it has no say; nor does
    a failure a retry cannot cure (``CURABLE``: a conversation too long, a quota, a refused key),
    which never carries a wait: without this, a rate limit's ``Retry-After: 20`` beside one was
    dropped, and the openai SDK gave up after its two quick retries.

    The failure is the gateway's own wording (``own``): each reason is what a client may read of
    that upstream's failure (errors.py ``upstream_failure``: a backend's 5xx words are withheld),
    the code is the deciding failure's (never read from the other upstreams' words), and the
    backends' own words go to the operator only (``metadata.raw``: the turn's error detail)."""
    shown, full = [], []
    for name, failure in tried:
        _, said, detail = upstream_failure(failure.status, failure.body, own=failure.own, forwarded=failure.forwarded)
        shown.append(f"{name} ({said})")
        full.append(f"{name} ({detail})")
    decides = deciding([f for _, f in tried])
    code = _code(decides)
    head = f"every upstream for model {model!r} failed: "
    error = {"message": head + "; ".join(shown), "type": "upstream_unavailable", "code": code}
    if full != shown:
        error["metadata"] = {"raw": "; ".join(full)}
    body = json.dumps({"error": error}).encode()
    waits = [f for _, f in tried if not f.own and kind(f) in CURABLE]
    if any(retry_seconds(f.retry_after) is None for f in waits):
        return UpstreamFailed(decides.status, body, None, own=True)
    return UpstreamFailed(decides.status, body, min((f.retry_after for f in waits), key=retry_seconds, default=None),
                          own=True)


class Attempt:
    """A channel stand-in for one candidate's call (module docstring). ``before``: events that
    go out just ahead of the first thing this candidate passes on (``Rerouted``)."""

    __slots__ = ("channel", "failure", "committed", "before")

    def __init__(self, channel: Channel, before: tuple[Event, ...] = ()) -> None:
        self.channel = channel
        self.failure: UpstreamFailed | None = None
        self.committed = False
        self.before = before

    def release(self) -> None:
        """This candidate answers the turn: its ``before`` events go now, once (by itself it
        commits at the first thing it passes on; a call that answered passing nothing on is
        committed so, by the relay)."""
        if not self.committed:
            self.committed = True
            for event in self.before:
                self.channel.event(event)

    def data(self, chunk: bytes) -> None:
        if chunk:
            if not self.committed:
                self.release()
            self.channel.data(chunk)

    def event(self, event: Event) -> None:
        if not self.committed:
            if isinstance(event, UpstreamFailed):
                self.failure = event
                return
            if not isinstance(event, Keepalive):
                self.release()
        self.channel.event(event)

    # what the relay's flow control reads and sets: the real channel's
    @property
    def size(self) -> int:
        return self.channel.size

    @property
    def closed(self) -> bool:
        return self.channel.closed

    @property
    def on_take(self):
        return self.channel.on_take

    @on_take.setter
    def on_take(self, callback) -> None:
        self.channel.on_take = callback

    @property
    def later(self):
        return self.channel.later

    @property
    def reads(self):
        return self.channel.reads

    @reads.setter
    def reads(self, reader) -> None:
        self.channel.reads = reader

    @property
    def sent(self) -> float | None:
        return self.channel.sent

    @sent.setter
    def sent(self, at: float | None) -> None:
        self.channel.sent = at
