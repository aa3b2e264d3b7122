"""What every resp2chat addon shares: where settings come from, and owning some of them.

``SettingsSource`` reads the environment and the config file once per process (the layer under
mitmproxy's ``--set``). An addon that owns settings subclasses ``Owner``: it declares the options
of its fields (``settings.owned_by(owner)``) in ``load`` and gets ``configure`` calls only for
what it reads (``reads``). Values reach it under their setting names.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import sys
from typing import Any, Callable, Sequence

from mitmproxy import ctx, exceptions, http, optmanager

from resp2chat_core.errors import GatewayError, error_json
from resp2chat_core.limits import retry_headers, retry_phrase

from resp2chat_core import settings as S
from resp2chat_io import META
from resp2chat_io.config import load_settings
from resp2chat_io.relay import KEY_HEADER, TURN_HEADER
from resp2chat_io.store import StateUnavailable

log = logging.getLogger("resp2chat")

JSON_HEADERS = {"content-type": "application/json"}
SSE_HEADERS = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}


class RecordText:
    """Bytes a flow's record keeps as text (a turn's client request, the chat request a fallback
    got, a socket turn's chat request and events): made text (UTF-8, a bad byte replaced) only
    when the flow's state is copied — what every flow file holds (mitmproxy's writer stores
    ``flow.get_state()``, which deep-copies the metadata: ``__deepcopy__`` gives the text),
    ``flow.copy()`` — or when ``str()`` asks for it. Making that text costs ~2–3 ms of CPU for a
    2.5 MB conversation (a new 5 MB string: its few non-ASCII characters make it two bytes a
    character), on every turn, for a flow that a gateway writing no flow file drops unread.
    ``len``: the bytes' (at least the text's characters: what a record's budget counts)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __str__(self) -> str:
        return self.data.decode("utf-8", "replace")

    def __deepcopy__(self, memo) -> str:
        return str(self)

    def __bool__(self) -> bool:
        return bool(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"RecordText({len(self.data)} bytes)"


def json_response(status: int, body: bytes | str | dict, **headers: str) -> http.Response:
    """An answer the gateway makes itself: a JSON body (``body``, or a dict encoded)."""
    if isinstance(body, dict):
        body = json.dumps(body, ensure_ascii=False)
    return http.Response.make(status, body, {**JSON_HEADERS, **{k.replace("_", "-"): v for k, v in headers.items()}})


def refusal(flow: http.HTTPFlow, err: GatewayError, extra: tuple = ()) -> http.Response:
    """A request the gateway refuses (``GatewayError``): its status and OpenAI error body, with
    the request id (``x-request-id``), ``retry-after`` when it says when to try again (the store
    down, a client's limit), and ``extra`` headers (a client's rate-limit headers)."""
    response = json_response(err.status, err.body(), x_request_id=request_id(flow))
    if err.retry_after is not None:
        response.headers.update(retry_headers(err.retry_after))
    response.headers.update(extra)
    return response


def store_unavailable(why: str) -> GatewayError:
    """The refusal of ``why`` while the shared state store (Redis) cannot be reached: a 503 with
    ``retry-after`` (``refusal``)."""
    return GatewayError(f"{why}: the shared state store (Redis) cannot be reached right now. " + retry_phrase(1),
                        code="store_unavailable", status=503, type="server_error", retry_after=1)


@contextlib.contextmanager
def refused_on_failure(flow: http.HTTPFlow, what: str):
    """Runs an endpoint's work on stored state: a ``GatewayError`` becomes the flow's refusal, the
    store being down a ``store_unavailable`` one naming ``what`` (e.g. ``"GET /v1/conversations/x"``).
    The caller returns when ``flow.response`` is set after the block."""
    try:
        yield
    except GatewayError as err:
        flow.response = refusal(flow, err)
    except StateUnavailable:
        flow.response = refusal(flow, store_unavailable(what))


def show_url(flow: http.HTTPFlow, url: str) -> None:
    """A flow pointed at the relay shows ``url`` again (where its request really went, or what the
    client asked for), without the relay's headers."""
    req = flow.request
    if req.headers.get(TURN_HEADER) is not None:
        req.url = url
        req.headers.pop(TURN_HEADER, None)
        req.headers.pop(KEY_HEADER, None)


def request_id(flow: http.HTTPFlow) -> str:
    """The gateway's id for a request: in error answers to the client and in the log."""
    return request_id_of(flow.id)


def request_id_of(uid: str) -> str:
    """A request id made of a flow's id (or of any UUID: an answer mitmproxy's layer sends
    before there is a flow, mitm_head.py)."""
    return "req_" + uid.replace("-", "")[:20]


# flow id -> what stops the work a flow set going before its answer began (a turn's backend call:
# Exchange.abort, registered by turns.py): called when the flow fails closed at its response head.
ABANDON: dict[str, Callable[[], None]] = {}


class Refusal:
    """A stream callable that sends one whole body in place of what the server sends: the 500 of
    a flow that failed closed at its response head. mitmproxy sends its headers at once and the
    body with the first bytes the server still sends, or at their end."""

    __slots__ = ("body", "sent")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.sent = b""  # the body, once it went out (the client may hang up before the flow ends)

    def __call__(self, data: bytes):
        body, self.body = self.body, b""
        if body:
            self.sent = body
        return [body] if body else []


def fail_closed(flow: http.HTTPFlow, where: str, exc: BaseException) -> None:
    """An unexpected exception in a hook: the request goes nowhere unmodified, the client gets a
    500 ``server_error`` naming the request id (no internals), the log gets the details.

    At the response head (``responseheaders``) nothing went out yet, but mitmproxy would read
    the server's whole body into the 500 before sending it (and a turn's body lasts as long as
    its backend call): the work the flow set going is given up (``ABANDON``) and the 500 is sent
    as a stream (``Refusal``), so the client has it at once."""
    rid = request_id(flow)
    log.warning(f"resp2chat: {where} failed for {rid}: {type(exc).__name__}: {exc}", exc_info=exc)
    flow.metadata.setdefault(META, {})["failed_in"] = where
    head = where.endswith(".responseheaders")
    if not head and flow.response is not None and flow.response.stream:
        return  # a started stream: its callable ends it (it never raises and always terminates)
    body = error_json(f"the gateway failed to handle this request (request id {rid})", status_type="server_error",
                      code="server_error")
    flow.response = json_response(500, body, x_request_id=rid)
    if head:
        flow.response.stream = Refusal(body)
        abandon = ABANDON.pop(flow.id, None)
        if abandon is not None:
            abandon()


HOOKS = frozenset({"requestheaders", "request", "responseheaders", "response", "error"})


def fails_closed(cls):
    """Class decorator: every flow hook of an addon fails closed (``fail_closed``)."""
    for name in HOOKS & set(vars(cls)):
        hook = vars(cls)[name]
        where = f"{getattr(cls, 'name', cls.__name__)}.{name}"
        if inspect.iscoroutinefunction(hook):
            async def wrapped(self, flow, _hook=hook, _where=where):
                try:
                    return await _hook(self, flow)
                except Exception as exc:  # noqa: BLE001
                    fail_closed(flow, _where, exc)
        else:
            def wrapped(self, flow, _hook=hook, _where=where):
                try:
                    return _hook(self, flow)
                except Exception as exc:  # noqa: BLE001
                    fail_closed(flow, _where, exc)
        setattr(cls, name, functools.wraps(hook)(wrapped))
    return cls


def open_log(setting: str, path: str, stderr: bool = False):
    """The log file a setting names (``access_log_path``, ``upstream_request_log_path``), opened to
    append one line at a time; None when ``path`` is empty; with ``stderr``, ``-`` is the process's
    stderr. Open the new file before closing the one in use: one that cannot be opened is refused
    in one line naming the setting and the path (an ``OptionsError``: mitmproxy keeps the options
    as they were, or stops at start-up), and the log in use is kept."""
    if not path:
        return None
    if stderr and path == "-":
        return sys.stderr
    try:
        return open(path, "a", buffering=1)
    except OSError as exc:
        raise exceptions.OptionsError(f"resp2chat: {setting}: cannot open {path}: "
                                      f"{exc.strerror or type(exc).__name__}") from None


def close_log(file) -> None:
    """Closes a log ``open_log`` gave (never stderr)."""
    if file is not None and file is not sys.stderr:
        file.close()


class SettingsSource:
    def __init__(self) -> None:
        self.base: dict | None = None  # environment + file, under --set
        self.warned: set[str] = set()  # (each warning once a process, not at every configure)

    def warn(self, message: str) -> None:
        if message not in self.warned:
            self.warned.add(message)
            log.warning(f"resp2chat: {message}")

    def load(self) -> dict:
        if self.base is None:
            try:
                self.base, sources, _, file_values = load_settings(os.environ)
                for name, source in sources.items():
                    if "deprecated" in source or any(source == "RESP2CHAT_" + a.upper() for a in S.BY_NAME[name].aliases):
                        self.warn(f"{S.deprecated(S.BY_NAME[name].aliases[0])} ({source})")
                for note in S.shadowed(file_values, os.environ) + S.unknown_variables(os.environ):
                    self.warn(note)
            except S.SettingsError as exc:
                log.error(f"resp2chat: {exc}")  # an error at start-up stops mitmdump (errorcheck)
                self.base = {f.name: f.default for f in S.FIELDS}
        return self.base

    def reloaded(self, name: str, value: Any) -> None:
        """The config file's ``name`` changed and was read again (addons/gate.py: its clients):
        what every later read of it gets, where neither ``--set`` nor the environment decide."""
        self.load()[name] = value

    def value(self, name: str) -> Any:
        """A setting's effective value: ``--set`` > environment > file > default."""
        f = S.BY_NAME[name]
        value = getattr(ctx.options, f.option)
        if S.hidden_default(f.name) and not value:
            value = self.load()[f.name]
        for old in f.aliases:  # (below the new name: one given beside it is ignored)
            given = getattr(ctx.options, "resp2chat_" + old, None)
            if given is None:
                continue
            if _given(f.option):
                self.warn(f"--set resp2chat_{old} is ignored: resp2chat_{f.name} is set too (the new name wins)")
            else:
                self.warn(f"{S.deprecated(old)} (--set resp2chat_{old})")
                value = given
        if f.kind == "map" and not value:
            value = "{}"
        return S.parse(f, value, f.option)

    def values(self, names) -> dict:
        try:
            return {n: self.value(n) for n in names}
        except S.SettingsError as exc:
            raise exceptions.OptionsError(str(exc)) from None


def _given(option: str) -> bool:
    """Whether ``option`` was given a value (``--set``, mitmweb's editor), even its default's.
    (mitmproxy's public ``has_changed`` compares with the default, which here is what the
    environment or the file say: the same value given again would not count.)"""
    opt = ctx.options._options.get(option)
    return opt is not None and opt.value is not optmanager.unset


class Owner:
    """An addon that declares the options of its settings group and reads some settings."""

    owner = ""  # its group in the settings table (Field.owner)
    also_reads: Sequence[str] = ()  # settings owned elsewhere that it reads
    watches: Sequence[str] = ()  # mitmproxy options it reads (e.g. "ssl_insecure")

    def __init__(self, source: SettingsSource) -> None:
        self.source = source
        self.fields = S.owned_by(self.owner)
        self.s: dict = {f.name: f.default for f in self.fields}
        self.s.update({n: S.BY_NAME[n].default for n in self.also_reads})

    def load(self, loader) -> None:
        base = self.source.load()
        for f in self.fields:
            default = "" if S.hidden_default(f.name) else S.to_option(f, base[f.name])
            loader.add_option(f.option, S.option_type(f), default, f.help)
            for old in f.aliases:
                loader.add_option("resp2chat_" + old, S.optional_type(f), None,
                                  f"Deprecated: the old name of resp2chat_{f.name}.")

    def _options(self) -> set[str]:
        names = {f.name for f in self.fields} | set(self.also_reads)
        opts = {S.BY_NAME[n].option for n in names}
        opts |= {"resp2chat_" + a for n in names for a in S.BY_NAME[n].aliases}
        return opts | set(self.watches)

    def configure(self, updated: set[str]) -> None:
        options = self._options()
        if not updated & options or not all(o in ctx.options for o in options if o.startswith("resp2chat_")):
            return  # nothing we read changed, or not every setting we read is declared yet
        self.s = self.source.values([f.name for f in self.fields] + list(self.also_reads))
        self.apply(updated)

    def apply(self, updated: set[str]) -> None:
        """React to changed settings (``self.s`` holds the new values)."""
