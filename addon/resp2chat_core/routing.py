"""Several upstreams: which ones serve a model, in which order, and when to try the next.

Rules of this file:
- The ``upstreams`` setting is an ordered list. A model goes to the *first* upstream whose
  ``models`` globs match the client's model name; every later match is a fallback, tried in
  order when the one before failed **before its first byte**: it could not be reached, or it
  answered 5xx or 429 (a gateway-observed silence is a 504). Never after anything of an answer
  reached the client, and never for another 4xx (the request itself is wrong; the next upstream
  would say the same).
- Each entry may carry the per-backend settings (the ``lowering`` settings of settings.py,
  same names): an upstream's own value wins over the top-level one, so each candidate gets its
  own byte-deterministic chat body.
- Invalid entries stop start-up with an error naming the entry and the field.

Theory of operation
-------------------
The relay runs one candidate at a time through an ``Attempt``, a stand-in for the turn's
``Channel`` (channel.py): backend data and most events pass straight through, but an
``UpstreamFailed`` that arrives before anything was passed is held back. If the failure falls
back and another candidate remains, nothing of it ever reaches the turn; the next candidate
gets a fresh ``Attempt``. ``Keepalive`` events pass without committing (they are the gateway's
own words to a waiting client, not part of an answer). When every candidate failed, one
``UpstreamFailed`` names them all (``all_failed``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Sequence

from . import settings as S
from .channel import Channel, Event, Keepalive, UpstreamFailed
from .errors import GatewayError, upstream_error_message

# Settings an upstream entry may set for itself: what lowering reads (LoweringOptions), bar the
# seal key (one gateway, one key).
OVERRIDABLE = tuple(f.name for f in S.FIELDS if f.owner == "lowering" and f.name != "seal_key")
_OWN = ("name", "base_url", "api_key", "models")


@dataclass(frozen=True)
class UpstreamSpec:
    """One entry of ``upstreams``, validated."""

    name: str
    base_url: str  # http(s)://host[:port][/prefix], or "demo"
    api_key: str = ""
    models: tuple[str, ...] = ("*",)  # glob patterns of client model names (fnmatch, case-sensitive)
    overrides: tuple[tuple[str, Any], ...] = ()  # per-backend settings, by setting name

    def serves(self, model: str) -> bool:
        return any(fnmatchcase(model, pattern) for pattern in self.models)

    def settings(self, base: dict) -> dict:
        """The top-level settings with this upstream's own values on top."""
        return {**base, **dict(self.overrides)} if self.overrides else base

    def __repr__(self) -> str:  # never the key
        return f"UpstreamSpec({self.name!r}, {self.base_url!r}, models={self.models!r})"


def parse_upstreams(value: Sequence[dict]) -> tuple[UpstreamSpec, ...]:
    """Validate the ``upstreams`` setting; ``SettingsError`` names the entry and the field."""
    specs: list[UpstreamSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise S.SettingsError(f"upstreams[{i}]", "[hidden]", "expected a mapping with name and base_url")
        label = f"upstreams[{i}]" + (f" ({entry['name']!r})" if isinstance(entry.get("name"), str) else "")

        def bad(key: str, why: str, shown: Any = None) -> S.SettingsError:
            # never a value that may be a secret: the key, an unknown field (a misspelt key?),
            # a URL (it may carry user:password)
            value = entry.get(key) if shown is None else shown
            if key in ("api_key", "base_url") or key not in _OWN + OVERRIDABLE:
                value = "[hidden]"
            return S.SettingsError(f"{label}.{key}", value, why)

        unknown = sorted(set(entry) - set(_OWN) - set(OVERRIDABLE))
        if unknown:
            raise bad(unknown[0], f"unknown field (known: {', '.join(_OWN + OVERRIDABLE)})")
        name = entry.get("name")
        if not isinstance(name, str) or not S.LABEL.match(name):
            raise bad("name", "expected a name of letters, digits, '_', '.', '-' (up to 64)")
        if name in seen:
            raise bad("name", "another entry has the same name")
        seen.add(name)
        url = entry.get("base_url")
        if not isinstance(url, str) or not url:
            raise bad("base_url", "required: the backend's Chat Completions base URL, e.g. http://10.0.0.5:8000/v1")
        try:
            S.validate("upstream_base_url", url)
        except S.SettingsError as exc:
            raise bad("base_url", exc.why) from None
        key = entry.get("api_key", "")
        if not isinstance(key, str):
            raise bad("api_key", "expected a string")
        models = entry.get("models", ["*"])
        if isinstance(models, str):
            models = [models]
        if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
            raise bad("models", "expected a non-empty list of model name patterns ('*' for any)")
        overrides = []
        for setting in OVERRIDABLE:
            if setting in entry:
                try:
                    v = S.coerce(S.BY_NAME[setting], entry[setting])
                    S.validate(setting, v)
                except S.SettingsError as exc:
                    raise bad(setting, exc.why) from None
                overrides.append((setting, v))
        specs.append(UpstreamSpec(name, url, key, tuple(models), tuple(overrides)))
    return tuple(specs)


def candidates(specs: Sequence[UpstreamSpec], model: str) -> tuple[UpstreamSpec, ...]:
    """The upstreams that serve ``model``, in order (the first answers, the rest fall back);
    ``GatewayError`` (404 ``model_not_found``) when none does."""
    found = tuple(s for s in specs if s.serves(model))
    if not found:
        raise GatewayError(f"no upstream serves model {model!r} (configured: "
                           + "; ".join(f"{s.name}: {', '.join(s.models)}" for s in specs) + ")",
                           param="model", code="model_not_found", status=404)
    return found


def falls_back(failure: UpstreamFailed) -> bool:
    """Worth trying the next upstream: unreachable (the relay's 502), silent (504), 5xx, 429."""
    return failure.status >= 500 or failure.status == 429


def all_failed(model: str, tried: Sequence[tuple[str, UpstreamFailed]]) -> UpstreamFailed:
    """One failure naming every upstream tried (and why), with the last one's status."""
    reasons = []
    for name, failure in tried:
        message, _ = upstream_error_message(failure.status, failure.body)
        reasons.append(f"{name} ({message})")
    last = tried[-1][1]
    text = f"every upstream for model {model!r} failed: " + "; ".join(reasons)
    body = json.dumps({"error": {"message": text, "type": "upstream_unavailable"}}).encode()
    return UpstreamFailed(last.status, body, last.retry_after)


class Attempt:
    """A channel stand-in for one candidate's call (module docstring). ``before``: events that
    go out just ahead of the first thing this candidate passes on (``Rerouted``)."""

    __slots__ = ("channel", "failure", "committed", "before")

    def __init__(self, channel: Channel, before: tuple[Event, ...] = ()) -> None:
        self.channel = channel
        self.failure: UpstreamFailed | None = None
        self.committed = False
        self.before = before

    def _commit(self) -> None:
        self.committed = True
        for event in self.before:
            self.channel.event(event)

    def data(self, chunk: bytes) -> None:
        if chunk:
            if not self.committed:
                self._commit()
            self.channel.data(chunk)

    def event(self, event: Event) -> None:
        if not self.committed:
            if isinstance(event, UpstreamFailed):
                self.failure = event
                return
            if not isinstance(event, Keepalive):
                self._commit()
        self.channel.event(event)

    # what the relay's flow control reads and sets: the real channel's
    @property
    def size(self) -> int:
        return self.channel.size

    @property
    def on_take(self):
        return self.channel.on_take

    @on_take.setter
    def on_take(self, callback) -> None:
        self.channel.on_take = callback
