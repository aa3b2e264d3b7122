"""A team's clients: who holds which key, which models each may use, each one's limits.

Rules of this file:
- The ``clients`` setting is a list of ``{name, id, key | key_sha256, models, rpm, tpm,
  max_streams, max_sockets}``. ``key`` (the client's key itself) is hashed here, at load, and never kept:
  a ``ClientSpec`` holds only its SHA-256 (hex). ``resp2chat keys add`` writes ``key_sha256``,
  so the config file never holds a key it made, and a random ``id``: the identity that owns
  what the client stores (owner.py), kept by ``keys rotate``, new for a name added anew. ``id``
  is optional (an entry without one is owned by its name, as before ids) and unique.
- ``accepted`` is the one rule of whether a key a request was let in with still is, after the
  clients were reloaded: an open WebSocket's next message and the turns in flight ask it.
- ``gateway_api_key``, when set, is one more client named ``default`` (all models, no limits).
- Names are unique and safe as Prometheus label values and log fields (``labels.OPERATOR_NAME``);
  two clients never share a key.
- A limit may come as text (the config file's fields are read as written: ``rpm: 017``; a JSON
  string): the whole number it says, as a whole-number setting reads it (17).
- Invalid entries stop start-up with ``SettingsError`` naming the entry and the field
  (``clients[1] ('alice').rpm: …``), as ``upstreams`` does; an error never shows a key.
- ``ClientTable.lookup`` finds a presented key by hashing it once and looking the digest up in
  a dict: the time it takes depends on the digest, never on how much of the key matched.

No I/O, no mitmproxy: the gate (resp2chat_io/addons/gate.py) builds the table from the setting.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Sequence

from .errors import GatewayError
from .labels import OPERATOR_NAME, shown
from .owner import of_client
from .settings_error import SettingsError  # (not settings.py: it validates ``clients`` with parse_clients)

# A key ``resp2chat keys`` makes: this prefix and 256 random bits (URL-safe base64, 43 characters),
# recognisable in a leak report or by a secret scanner, and by the gate in a URL (gate.py
# ``without_credentials``), where the config holds only its hash.
KEY_PREFIX = "r2c-"
KEY_SHAPE = re.compile(r"(?<![A-Za-z0-9_-])" + re.escape(KEY_PREFIX) + r"[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])")

DEFAULT = "default"  # the client gateway_api_key stands for
FIELDS = ("name", "key", "key_sha256", "models", "rpm", "tpm", "max_streams", "max_sockets", "id")
LIMITS = ("rpm", "tpm", "max_streams", "max_sockets")
# the largest limit (rpm, tpm, max_streams, max_sockets): far past any real one, and exact in a
# float and in Redis's Lua numbers, where the buckets are counted (a larger int, 10**400, cannot
# even become a float: every request of the client would have failed with a 500)
MAX_LIMIT = 10**12
MIN_KEY_LEN = 16  # a plain key in the config: shorter ones can be guessed (`keys add` makes 47 characters)
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}\Z")
_KEY = re.compile(r"^[\x21-\x7e]+\Z")  # printable ASCII without spaces: it travels in an HTTP header
_ID = re.compile(r"^[A-Za-z0-9_-]{16,48}\Z")  # a client's identity (``keys add`` writes 32 hex digits): part of its owner


def key_sha256(key: str | bytes) -> str:
    """The SHA-256 of a key, hex: what the config file and a ``ClientSpec`` hold. A ``str`` is
    hashed as UTF-8 (surrogate escapes as the bytes they stand for, as mitmproxy decodes headers)."""
    raw = key if isinstance(key, bytes) else key.encode("utf-8", "surrogateescape")
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class ClientSpec:
    """One client, validated. Limits: ``None`` is unlimited."""

    name: str
    key_sha256: str  # hex, lowercase
    models: tuple[str, ...] = ("*",)  # glob patterns of model names it may use (fnmatch, case-sensitive)
    rpm: int | None = None  # requests that make a backend work (turns, passthrough calls but reads, input_tokens) per minute
    tpm: int | None = None  # backend tokens per minute (prompt + output)
    max_streams: int | None = None  # such requests open at once
    max_sockets: int | None = None  # Responses WebSockets open at once (on one replica: what they hold is its memory)
    # who holds it: ``keys add`` writes a random one, ``keys rotate`` keeps it; what the client stores
    # is this identity's (owner.of_client), so a name revoked and given to someone else is a new
    # owner. None: an entry without one (written by hand, or before ids): its name is its owner.
    # Not a secret (the config file, the Redis keys show it).
    id: str | None = None

    @property
    def identity(self) -> str:
        """Who holds it: what its stored state and its limits' counts are kept under
        (owner.of_client): kept by ``keys rotate``, new for a name revoked and added again."""
        return of_client(self.name, self.id)

    @property
    def fingerprint(self) -> str:
        """The first 8 hex digits of the key's SHA-256: tells keys apart in listings
        (``printf %s "$KEY" | sha256sum | cut -c1-8``) and says next to nothing about the key."""
        return self.key_sha256[:8]

    def __repr__(self) -> str:  # no digest: a log line or traceback names the client, not its key's hash
        limits = "".join(f", {k}={getattr(self, k)}" for k in LIMITS if getattr(self, k) is not None)
        return f"ClientSpec({self.name!r}, models={self.models!r}{limits})"


REVOKED = "invalid_api_key"  # the code of a request (or a turn in flight) whose key is no longer accepted
STOPPED = ("the API key this response was started with is no longer accepted (revoked or changed, or the gateway "
           "now requires one): it was stopped")


def accepted(now: "ClientTable", keyed: bool, spec: "ClientSpec | None") -> bool:
    """Is the key a request was let in with still accepted by the clients configured ``now``?
    ``spec``: the client it named then (None: the gateway took no keys then); ``keyed``: the
    gateway started with keys (then no key is ever enough). The same client means the same
    name, key and identity (``id``): a key given to the name anew, or the name given to someone
    else, is not it."""
    if spec is None:
        return not len(now) and not keyed
    current = now.named(spec.name)
    return current is not None and current.key_sha256 == spec.key_sha256 and current.id == spec.id


def no_longer_accepted() -> GatewayError:
    """The refusal of a request on a connection whose key is no longer ``accepted`` (an open WebSocket)."""
    return GatewayError("this connection's API key is no longer accepted (revoked or changed)",
                        type="authentication_error", code=REVOKED, status=401)


def allows_model(spec: ClientSpec, model: str) -> bool:
    """The client may use ``model``: one of its globs matches (as routing.py matches upstreams)."""
    return matches(spec.models, model)


def matches(globs, model: str) -> bool:
    """One of ``globs`` (a client's ``models``) matches ``model``."""
    return any(fnmatchcase(model, pattern) for pattern in globs)


def check_model(globs, model: object) -> None:
    """A passthrough request (``passthrough_paths``: embeddings…) of a client limited to
    ``globs``: its body must name one of its models, as a turn's does (``GatewayError``
    otherwise: 404 ``model_not_found``, or a 400 when it names none: the backend would pick one)."""
    if not isinstance(model, str) or not model:
        raise GatewayError("this key may use some models only (clients: models): the request body must name one "
                           "of them as 'model'", param="model", code="missing_required_parameter")
    if not matches(globs, model):
        raise not_allowed(model)


def not_allowed(model: str) -> GatewayError:
    """A model outside a client's ``models``: to it, one that does not exist (as OpenAI says it)."""
    return GatewayError(f"the model {shown(model)!r} does not exist or you do not have access to it",
                        param="model", code="model_not_found", status=404)


def parse_clients(entries: Sequence[Any], gateway_api_key: str = "") -> tuple[ClientSpec, ...]:
    """Validate the ``clients`` setting (and ``gateway_api_key``, its ``default`` client);
    ``SettingsError`` names the entry and the field, and never shows a key."""
    specs: list[ClientSpec] = []
    names: dict[str, str] = {}  # name -> the entry that has it
    digests: dict[str, str] = {}  # key digest -> the entry that has it
    ids: dict[str, str] = {}  # id -> the entry that has it
    if gateway_api_key:
        digests[key_sha256(gateway_api_key)] = "gateway_api_key"
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise SettingsError(f"clients[{i}]", "[hidden]", "expected a mapping with name and key (or key_sha256)")
        label = f"clients[{i}]" + (f" ({entry['name']!r})" if isinstance(entry.get("name"), str) else "")

        def bad(field: str, why: str) -> SettingsError:
            # the value only where it cannot be a key: not key/key_sha256, not an unknown field (a misspelt key?)
            shown = entry.get(field) if field in ("name", "id", "models") + LIMITS else "[hidden]"
            return SettingsError(f"{label}.{field}", shown, why)

        unknown = sorted(set(entry) - set(FIELDS), key=str)
        if unknown:
            raise bad(str(unknown[0]), f"unknown field (known: {', '.join(FIELDS)})")
        name = entry.get("name")
        if not isinstance(name, str) or not OPERATOR_NAME.match(name):
            raise bad("name", "expected a name of letters, digits, '_', '.', '-' (up to 64, starting with a letter or digit)")
        if name in names:
            raise bad("name", f"{names[name]} has the same name")
        if name == DEFAULT and gateway_api_key:
            raise bad("name", "'default' is the client of gateway_api_key: rename this one, or leave gateway_api_key unset")
        names[name] = label
        has_key, has_digest = entry.get("key") is not None, entry.get("key_sha256") is not None
        if has_key == has_digest:
            raise bad("key", "give exactly one of key (the client's key, hashed at load) or key_sha256 "
                             "(its SHA-256, 64 hex digits: `resp2chat keys add` writes it)")
        if has_key:
            key = entry["key"]
            if not isinstance(key, str) or not _KEY.match(key):
                raise bad("key", "expected a string of printable ASCII characters without spaces")
            if len(key) < MIN_KEY_LEN:
                raise bad("key", f"too short: at least {MIN_KEY_LEN} characters (`resp2chat keys add` makes strong ones)")
            digest, field = key_sha256(key), "key"
        else:
            digest, field = entry["key_sha256"], "key_sha256"
            if not isinstance(digest, str) or not _HEX64.match(digest):
                raise bad("key_sha256", "expected the key's SHA-256 as 64 hex digits")
            digest = digest.lower()
        if digest in digests:
            raise bad(field, f"{digests[digest]} has the same key")
        digests[digest] = label
        models = entry.get("models", ["*"])
        if isinstance(models, str):
            models = [models]
        if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
            raise bad("models", "expected a non-empty list of model name patterns ('*' for any)")
        limits = {}
        for limit in LIMITS:
            value = whole(entry.get(limit))
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 < value <= MAX_LIMIT):
                raise bad(limit, f"expected a whole number > 0, at most {MAX_LIMIT:,} (leave it out for no limit)")
            limits[limit] = value
        ident = entry.get("id")
        if ident is not None:
            if not isinstance(ident, str) or not _ID.match(ident):
                raise bad("id", "expected 16 to 48 letters, digits, '_' or '-' (`resp2chat keys add` writes one)")
            if ident in ids:
                raise bad("id", f"{ids[ident]} has the same id (an id is one client's: its stored state)")
            ids[ident] = label
        specs.append(ClientSpec(name, digest, tuple(models), **limits, id=ident))
    if gateway_api_key:
        specs.append(ClientSpec(DEFAULT, key_sha256(gateway_api_key)))
    return tuple(specs)


def whole(value: Any) -> Any:
    """A whole number given as text (the config file's ``rpm: 017``, as written; a JSON string) as
    the number it says, as a whole-number setting reads it (settings.py ``coerce``: ``017`` is
    17, ``1_000`` 1000); text that says none stays as it is (``parse_clients`` refuses it). Any
    other value as it is. The one reading of a whole number in an entry: a client's limits here,
    and config.py's (``_typed``) for the file's ``clients`` and ``upstreams`` entries."""
    if isinstance(value, str):
        try:
            return int(value, 10)
        except ValueError:
            return value
    return value


class ClientTable:
    """Presented key -> its client. Built once per settings change; ``lookup`` is one SHA-256
    and one dict lookup, whatever the number of clients."""

    __slots__ = ("specs", "_by_digest", "_by_name")

    def __init__(self, specs: Sequence[ClientSpec] = ()) -> None:
        self.specs = tuple(specs)
        self._by_digest = {s.key_sha256: s for s in self.specs}
        self._by_name = {s.name: s for s in self.specs}

    def lookup(self, presented: str | bytes) -> ClientSpec | None:
        """The client whose key this is, or ``None`` (an empty key is nobody's)."""
        if not presented:
            return None
        return self._by_digest.get(key_sha256(presented))

    def named(self, name: str) -> ClientSpec | None:
        return self._by_name.get(name)

    @property
    def names(self) -> tuple[str, ...]:
        """Every client's name, in order: the only values a ``client`` metric label takes."""
        return tuple(s.name for s in self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __eq__(self, other) -> bool:
        return isinstance(other, ClientTable) and self.specs == other.specs

    def __repr__(self) -> str:
        return f"ClientTable({', '.join(self.names)})"
