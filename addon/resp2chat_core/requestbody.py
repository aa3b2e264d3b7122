"""A request body as the gateway accepts it: strict UTF-8 JSON, refused with the offset.

Rules of this file:
- Sans-I/O, and the first thing that decodes a ``/v1/responses`` body (turn.py ``decode_body``):
  nothing the gateway could not encode again may get past it, because what is lowered from it
  goes to a backend byte for byte.
- Every refusal is a ``GatewayError`` 400 ``invalid_json`` whose message says where (a byte
  offset into the body as received).

Theory of operation
-------------------
``json.loads`` is lenient where a gateway must not be. Given bytes it guesses an encoding
(UTF-16 and UTF-32 too) and decodes with ``surrogatepass``, so ``ED A0 80`` inside a string
becomes a lone surrogate that no encoder will write again (the lowering then raised
``UnicodeEncodeError``). It turns ``\\ud800`` escapes into the same lone surrogates. And it
accepts ``NaN``, ``Infinity`` and numbers too large for a float (``1e400`` -> ``inf``), which
Python would send upstream as the non-JSON tokens ``NaN``/``Infinity``.

So: decode the bytes as UTF-8 strictly (the error gives the offset); parse the text with
``parse_constant`` and ``parse_float`` that refuse non-finite numbers (the C scanner stays in
use, so the common path costs nothing extra); then, only if the text holds an escape in the
surrogate range at all (one C-speed search), walk its escapes in order — ``\\\\`` is consumed as a
pair, so an escaped backslash before ``ud800`` is never mistaken for an escape — and refuse the
first surrogate escape that is not a high one followed at once by a low one.

History decoded once
--------------------
Codex resends its whole conversation on every HTTP turn, and the JSON of what it sent before is
byte for byte the same: turn n+1's body starts with turn n's, up to the end of turn n's last
input item. Decoding 2.5 MB of it again costs ~5 ms a turn. So a body of ``PREFIX_MIN`` bytes
or more is decoded with a trace (``_Trace``: the members before ``input``, the decoded items,
the byte offset where each item ends), and kept (``Prefixes``, bounded). A later body that
starts with the same bytes as one kept, through the end of some of its items (one C ``memcmp``,
``bytes.startswith``), gets those items' decoded values again, the members before them too;
only the bytes after them are decoded (strictly, as above) and checked. The value is the one
``json.loads`` gives (``test_prefix_cache.py`` checks it against a cold decode), and so is every
refusal: anything the traced parse does not expect (not an object, a key twice, an error) is
decoded again by the plain path, which says what is wrong.

The body's digest (SHA-256, the replay cache's key: resp2chat_core/replay.py ``replay_key``)
is taken the same way: ``body_digest`` of a body the cache decoded hashes only what follows the
last state it kept of the history (one every ``DIGEST_STEP`` bytes: ``_Trace.marks``), not the
2.5 MB again (~2.3 ms); it is taken when first asked for (a turn the cache does not look up
never hashes), and a body that went on from one hashed before starts from that one's states.

Values handed out are shared with the cache and later requests: like every decoded request,
they are read, never changed in place (a new dict is made instead: ``{**raw, ...}``). Except in
one place: resp2chat_io/offload.py empties what a worker thread decoded privately once it is
done with it (``_empty``: a refused large body, the store's prefetch), container by container,
so that freeing a million objects does not hold the event loop. So:

- a ``yielding`` decode (the worker's: a large body) uses the cache too, with the decoder's
  Python-level hooks (the GIL changes hands between objects, as in ``_loads``);
- the cache keeps a body only while what it decoded to is cheap to free wherever it is dropped
  (``OBJECTS``: at most that many JSON objects and arrays, counted from the bytes, an upper
  bound), so an eviction on the event loop frees no more than a small body's decode makes;
- a value that shares nothing with the cache comes back as ``Private`` (a dict) when
  ``yielding`` — what offload.py may empty; ``loads_private`` decodes one for a caller that
  needs only a few fields (the store's prefetch).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from dataclasses import dataclass
from json.decoder import scanstring

from .errors import GatewayError

_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # any escape in U+D800..U+DFFF
# An escape: a valid surrogate pair, a lone surrogate, or anything else (one char after "\").
_ESCAPE = re.compile(r"\\(?:u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
                     r"|(u[dD][89a-fA-F][0-9a-fA-F]{2})|.)", re.S)


def _invalid(message: str) -> GatewayError:
    return GatewayError(message, code="invalid_json")


def _constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _byte_offset(text: str, pos: int) -> int:
    return len(text[:pos].encode())


def _same(value: dict) -> dict:
    return value


def _int(text: str) -> int:
    return int(text)


class Private(dict):
    """A large body's value that shares nothing with the cache (``loads(yielding=True)``):
    offload.py may empty it."""

    __slots__ = ()


def loads(body: bytes, yielding: bool = False):
    """``_loads``, with the history a body shares with one decoded before taken from the cache
    (``PREFIXES``) when the body is ``PREFIX_MIN`` bytes or more (see "History decoded once").
    ``yielding`` (a worker thread's decode): the decoder hands the GIL over between objects, and
    a value the cache does not share comes back as ``Private``."""
    if len(body) < PREFIX_MIN:
        return _loads(body, yielding)
    found = PREFIXES.decode(body, yielding)
    if found is not None:
        return found
    return loads_private(body) if yielding else _loads(body)


def loads_private(body: bytes):
    """The body's value decoded in a worker thread (``yielding``), sharing nothing with the cache:
    ``Private`` when it is an object."""
    value = _loads(body, True)
    return Private(value) if type(value) is dict else value


def loads_keys(body: bytes, yielding: bool = False) -> tuple[object, frozenset[str]]:
    """The body's value, as ``_loads`` gives it (never the cache's: for a caller that reads a few
    members of it), and the keys its top-level object names more than once. ``json.loads`` keeps
    the last of a key given twice, and so does every check the gateway makes of the value; a
    backend that gets the body as it is may take the first (resp2chat_io/addons/upstreams.py: a
    passthrough's ``model``)."""
    top: list = [()]

    def pairs(members: list) -> dict:
        top[0] = members  # (the top-level object's hook is called last: its members end last)
        return dict(members)

    value = _loads(body, yielding, pairs)
    if type(value) is not dict or len(value) == len(top[0]):
        return value, frozenset()
    seen: set[str] = set()
    return value, frozenset(k for k, _ in top[0] if k in seen or seen.add(k))


def _loads(body: bytes, yielding: bool = False, pairs=None):
    """The body's JSON value; ``GatewayError`` (400 ``invalid_json``) if it is not strict UTF-8
    JSON with finite numbers and valid Unicode strings.

    ``yielding``: for a decode in a worker thread (resp2chat_io/offload.py). The C decoder holds
    the GIL from start to end, so a thread decoding 30 MB would stall the event loop as much as
    decoding on it; with a Python-level hook at every object and number (the same values), the
    interpreter hands the GIL over between them, as it does every few milliseconds. ``pairs``:
    json's ``object_pairs_hook`` (``loads_keys``), a Python-level hook at every object too."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid(f"request body is not valid UTF-8: {exc.reason} at byte offset {exc.start}") from None
    hooks = {"object_hook": _same, "parse_int": _int} if yielding else {}
    if pairs is not None:
        hooks["object_pairs_hook"] = pairs
    try:
        data = json.loads(text, parse_constant=_constant, parse_float=_float, **hooks)
    except json.JSONDecodeError as exc:
        raise _invalid(f"request body is not valid JSON: {exc.msg} at byte offset "
                       f"{_byte_offset(text, exc.pos)}") from None
    except ValueError as exc:  # a number we refuse, or an integer of more than 4300 digits
        why = "an integer has too many digits" if "digits" in str(exc) else str(exc)
        raise _invalid(f"request body is not valid JSON: {why}") from None
    except RecursionError:
        raise _invalid("request body is nested too deeply") from None
    m = _lone_surrogate(text)
    if m is not None:
        raise _invalid(f"request body has a lone surrogate escape (\\{m.group(1)}) at byte offset "
                       f"{_byte_offset(text, m.start())}: JSON strings must be valid Unicode")
    return data


def _lone_surrogate(text: str):
    """The first escape of a lone surrogate in a JSON text (a match: group 1 is the escape), or
    None: one C-speed search when the text holds no escape in the surrogate range at all."""
    if _SURROGATE.search(text) is None:
        return None
    for m in _ESCAPE.finditer(text):
        if m.group(1):
            return m
    return None


# --- history decoded once --------------------------------------------------------------------

PREFIX_MIN = 64 << 10  # bytes: smaller bodies decode in ~0.15 ms and are not traced
DIGEST_STEP = 256 << 10  # bytes: a traced body's digest keeps the hash's state this often (``_Trace.marks``)


_SCAN = json.JSONDecoder(parse_constant=_constant, parse_float=_float, strict=True).scan_once
# (a worker thread's: a Python-level hook at every object and integer, so the GIL changes hands)
_SCAN_YIELDING = json.JSONDecoder(object_hook=_same, parse_int=_int, parse_constant=_constant, parse_float=_float,
                                  strict=True).scan_once
OBJECTS = 250_000  # JSON objects and arrays a kept body may decode to (a 1 MiB body decoded on the loop makes as many)
_WS = re.compile(r"[ \t\n\r]*").match  # JSON's whitespace
_SPACE = frozenset(" \t\n\r")


class _Odd(Exception):
    """A shape the traced parse does not handle: the plain path decodes the body (or says why not)."""


@dataclass(eq=False)
class _Trace:
    """A body decoded before: its bytes, the members before ``input`` and the items (their
    decoded values) with the byte offset just past each one."""

    body: bytes
    head: tuple  # ((key, value), ...) in order, before "input"
    items: tuple  # the decoded items
    ends: tuple  # ends[i]: the offset in ``body`` just past item i
    objects: int = 0  # an upper bound of the JSON objects and arrays its value holds (``OBJECTS``)
    # its digest (``body_digest``), once asked for: SHA-256 of ``body``, and ``marks``, the hash's
    # states of its first k * DIGEST_STEP bytes ((offset, state), ...); ``origin``: the marks of
    # the body it went on from, and how many bytes they share (``_warm``), to start from
    digest: bytes = b""
    marks: tuple = ()
    origin: tuple = ((), 0)

    def take_digest(self) -> bytes:
        """SHA-256 of ``body``: from the last state of ``origin`` within the bytes shared with
        the body it went on from, the rest hashed (keeping a state every ``DIGEST_STEP`` bytes)."""
        if not self.digest:
            marks_from, at = self.origin
            kept, h, pos = [], None, 0
            for off, state in marks_from:
                if off > at:
                    break
                kept.append((off, state))
                h, pos = state, off
            h = h.copy() if h is not None else hashlib.sha256()
            view, step = memoryview(self.body), DIGEST_STEP
            while pos + step <= len(view):
                h.update(view[pos:pos + step])
                pos += step
                kept.append((pos, h.copy()))
            h.update(view[pos:])
            self.marks, self.origin = tuple(kept), ((), 0)
            self.digest = h.digest()
        return self.digest

    def shared(self, body: bytes) -> int:
        """How many of this body's first items ``body`` holds too, byte for byte at the same
        offsets (with everything before them)."""
        ends, old = self.ends, memoryview(self.body)
        if not ends or not body.startswith(old[:ends[0]]):
            return 0
        if len(body) > ends[-1] and body.startswith(old[:ends[-1]]):
            return len(ends)  # (the common case: a conversation that went on)
        lo, hi = 1, len(ends) - 1  # ends[lo - 1] is shared, ends[hi] is not: bisect between
        while lo <= hi:
            mid = (lo + hi) // 2
            if body.startswith(old[:ends[mid]]):
                lo = mid + 1
            else:
                hi = mid - 1
        return lo


def _byte_ends(text: str, start: int, char_ends: list[int], base: int, ascii_: bool) -> list[int]:
    """Byte offsets (``base`` + UTF-8 length of ``text[start:e]``) of the char offsets ``char_ends``."""
    if ascii_:
        return [base + e - start for e in char_ends]
    out, pos, at = [], start, base
    for e in char_ends:
        piece = text[pos:e]
        at += len(piece) if piece.isascii() else len(piece.encode())
        out.append(at)
        pos = e
    return out


def _items(text: str, pos: int, scan, items: list, ends: list, first: bool) -> int:
    """Items of the ``input`` array from ``pos`` (after its ``[``: ``first``; or after an item) to
    its ``]``, appended to ``items``, each one's end (char offset) to ``ends``; returns the
    offset after the ``]``."""
    pos = _WS(text, pos).end()
    if text.startswith("]", pos):
        return pos + 1
    if not first:
        if not text.startswith(",", pos):
            raise _Odd
        pos = _WS(text, pos + 1).end()
    add, end = items.append, ends.append
    while True:
        value, pos = scan(text, pos)
        add(value)
        end(pos)
        c = text[pos:pos + 1]
        if c == ",":  # (compact JSON, as Codex sends: no whitespace to skip)
            pos += 1
            if text[pos:pos + 1] in _SPACE:
                pos = _WS(text, pos).end()
        elif c == "]":
            return pos + 1
        else:
            pos = _WS(text, pos).end()
            if text.startswith(",", pos):
                pos = _WS(text, pos + 1).end()
            elif text.startswith("]", pos):
                return pos + 1
            else:
                raise _Odd


def _members(text: str, pos: int, scan, out: dict, items: list | None, ends: list) -> tuple[int | None, int]:
    """The top-level object's members from ``pos`` to its end (and the end of the text), into
    ``out``: after its ``{`` when ``out`` is empty, else after a member. The ``input`` array, when
    ``items`` is a list, is read item by item into it. Returns where ``input``'s items start in
    ``text`` (None: not read here) and how many members came before it."""
    start, before = None, 0
    pos = _WS(text, pos).end()
    if out:  # after a member: the object ends, or a comma
        if text.startswith("}", pos):
            _end(text, pos)
            return start, before
        if not text.startswith(",", pos):
            raise _Odd
        pos = _WS(text, pos + 1).end()
    while True:
        if not text.startswith('"', pos):
            raise _Odd  # (an empty object too: the plain path decodes it)
        key, pos = scanstring(text, pos + 1, True)
        if key in out:
            raise _Odd  # (a key twice: json.loads keeps the last; the plain path does that)
        pos = _WS(text, pos).end()
        if not text.startswith(":", pos):
            raise _Odd
        pos = _WS(text, pos + 1).end()
        if key == "input" and items is not None and text.startswith("[", pos):
            start, before = pos + 1, len(out)
            pos = _items(text, pos + 1, scan, items, ends, True)
            out[key] = items
            items = None
        else:
            out[key], pos = scan(text, pos)
        pos = _WS(text, pos).end()
        if text.startswith(",", pos):
            pos = _WS(text, pos + 1).end()
        elif text.startswith("}", pos):
            _end(text, pos)
            return start, before
        else:
            raise _Odd


def _end(text: str, pos: int) -> None:
    if _WS(text, pos + 1).end() != len(text):
        raise _Odd  # (extra data)


class Prefixes:
    """The bodies decoded last (with their traces), for the history later bodies share.

    Bounded: at most ``entries`` bodies and ``max_bytes`` bytes of them (their decoded values
    take ~1.5x that again, shared with the turns and stores that hold the same request). A body
    that goes on from one kept replaces it (a session holds one entry). Thread-safe: large bodies
    may be decoded in a worker thread, small ones on the event loop."""

    def __init__(self, max_bytes: int = 24 << 20, entries: int = 8):
        self.max_bytes, self.max_entries = max_bytes, entries
        self._kept: list[_Trace] = []  # least recently used first
        self._lock = threading.Lock()
        self.hits = 0  # bodies that shared history with one kept
        self.reused = 0  # items found again, in all

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()

    @property
    def size(self) -> int:
        return sum(len(t.body) for t in self._kept)

    def _best(self, body: bytes) -> tuple[_Trace | None, int]:
        best, shared = None, 0
        for trace in reversed(self._kept):
            n = trace.shared(body)
            if n > shared:
                best, shared = trace, n
                if n == len(trace.ends):
                    break
        return best, shared

    def decode(self, body: bytes, yielding: bool = False, new: int | None = None):
        """``_loads(body)``'s value, decoded with a trace and kept; None when the traced parse
        cannot say (invalid JSON, a shape it does not handle): ``_loads`` then decides.
        ``yielding``: a worker thread's decode (module docstring); a value the cache does not
        share is ``Private``, and one that would share some but is too big to keep is None (the
        caller decodes it privately). ``new``: None as well, at once, unless a body kept shares
        all but fewer than ``new`` of its bytes (resp2chat_io/offload.py decodes such a body on
        the event loop: what is new is small)."""
        with self._lock:
            old, shared = self._best(body)
            if new is not None and (old is None or len(body) - old.ends[shared - 1] >= new):
                return None
            if old is not None:
                self._kept.remove(old)
                self._kept.append(old)
        scan = _SCAN_YIELDING if yielding else _SCAN
        try:
            if old is None:
                value, trace = self._cold(body, scan)
            else:
                value, trace = self._warm(body, scan, old, shared)
        except (_Odd, ValueError, StopIteration, RecursionError, IndexError):
            return None  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        if trace is not None and trace.objects > OBJECTS:
            if old is not None:
                return None  # (its value shares the history: a private decode instead)
            trace = None
        if trace is None:
            return Private(value) if yielding else value
        with self._lock:
            if old is not None:
                self.hits += 1
                self.reused += shared
                if shared == len(old.ends) and old in self._kept:
                    self._kept.remove(old)  # the conversation went on: the new body holds all of it
            self._kept.append(trace)
            while self._kept and (len(self._kept) > self.max_entries or self.size > self.max_bytes):
                self._kept.pop(0)
        return value

    def digest(self, body: bytes) -> bytes | None:
        """``body_digest`` of a body kept (this very object, as decoded last); None if none is."""
        with self._lock:
            for trace in reversed(self._kept):
                if trace.body is body:
                    return trace.take_digest()
        return None

    @staticmethod
    def _cold(body: bytes, scan):
        text = body.decode("utf-8")
        out, items, ends = {}, [], []
        pos = _WS(text, 0).end()
        if not text.startswith("{", pos):
            raise _Odd
        start, before = _members(text, pos + 1, scan, out, items, ends)
        if _lone_surrogate(text) is not None:
            raise _Odd  # (the plain path says which escape, and where)
        if start is None or not items:
            return out, None
        ascii_ = len(text) == len(body)
        base = start if ascii_ else len(text[:start].encode())
        head = tuple(out.items())[:before]
        return out, _Trace(body, head, tuple(items), tuple(_byte_ends(text, start, ends, base, ascii_)),
                           body.count(b"{") + body.count(b"["))

    @staticmethod
    def _warm(body: bytes, scan, old: _Trace, shared: int):
        at = old.ends[shared - 1]  # the body's bytes before this are old's
        text = body[at:].decode("utf-8")  # (``at`` follows a JSON value's last byte: ASCII)
        out = dict(old.head)
        items, ends = list(old.items[:shared]), []
        pos = _items(text, 0, scan, items, ends, False)
        out["input"] = items
        _members(text, pos, scan, out, None, [])
        if _lone_surrogate(text) is not None:  # (no string spans ``at``: it is between two values)
            raise _Odd
        ascii_ = len(text) == len(body) - at
        trace = _Trace(body, old.head, tuple(items), old.ends[:shared] + tuple(_byte_ends(text, 0, ends, at, ascii_)),
                       old.objects + text.count("{") + text.count("["), origin=(old.marks, at))
        return out, trace


PREFIXES = Prefixes()  # one per process: a body is decoded before the gateway knows whose it is


def body_digest(body: bytes) -> bytes:
    """SHA-256 of a request body, as bytes: for one the cache decoded (``loads``, just before),
    only what follows the history it shares with the body before it is hashed (the module's
    docstring)."""
    if len(body) >= PREFIX_MIN:
        found = PREFIXES.digest(body)
        if found is not None:
            return found
    return hashlib.sha256(body).digest()
