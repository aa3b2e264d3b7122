"""resp2chat: serve the OpenAI Responses API from any Chat Completions backend.

    mitmdump -s addon/resp2chat.py --mode reverse:http://127.0.0.1:8000

This file is the mitmproxy side only: options, hooks, commands. Translation lives in the
sans-I/O package ``resp2chat_core`` beside it. Per flow:

- ``request``: ``POST /v1/responses`` is validated and lowered into ``POST {upstream}/chat/completions``
  (the flow's request becomes the chat request, so flow files and server replay see what the
  backend saw); other ``/v1/*`` calls are routed to the upstream; ``/healthz`` is answered here.
- ``responseheaders``: for a streaming client, a stream callable translates the upstream SSE
  chunk by chunk into Responses events; error statuses become ``response.failed`` in that stream.
- ``response``: a non-streaming client gets the finished Response object as one JSON body.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import time
import uuid
from urllib.parse import urlsplit

from mitmproxy import command, ctx, exceptions, http
from mitmproxy.proxy import mode_specs

from resp2chat_io import views
from resp2chat_io.config import load_settings
from resp2chat_io.mitm import (
    FAILED_STATUS, RawPrinter, SSEStream, Upstream, redact, reverse_target, scrub, session_key,
)
from resp2chat_io.relay import TARGET_HEADER, WEB_SEARCH_HEADER, Relay
from resp2chat_io.store import ResponseStore
from resp2chat_core import settings as S
from resp2chat_core.errors import GatewayError, error_json
from resp2chat_core.lowering import LoweringOptions
from resp2chat_core.replay import ReplayCache, entry_flags, pack, replay_key, unpack_fresh
from resp2chat_core.turn import ToolsCache, Turn, begin_turn

log = logging.getLogger("resp2chat")

DEFAULT_UPSTREAM = "http://127.0.0.1:8000/v1"
RESPONSES_PATHS = ("/v1/responses", "/responses")
JSON_HEADERS = {"content-type": "application/json"}
META = "resp2chat"  # flow.metadata key: saved in flow files, read by the views and `analyze`


class Resp2Chat:
    def __init__(self) -> None:
        self.turns: dict[str, Turn] = {}
        self.settings: dict = {f.name: f.default for f in S.FIELDS}
        self.base: dict = dict(self.settings)  # environment + file, under --set
        self.upstream: Upstream | None = None
        self.lowering = LoweringOptions()
        self.demo = None  # the bundled demo upstream server, when upstream_base_url == "demo"
        self.request_log = None
        self.replay = ReplayCache(0)
        self.tools_cache = ToolsCache()
        self.relay = Relay()
        self.store: ResponseStore | None = None
        self._store_config: tuple | None = None
        self._lowering_repr = repr(self.lowering)
        self.secrets: tuple[bytes, ...] = ()  # configured keys, scrubbed from everything we emit
        self._rebind = False

    # --- options ---------------------------------------------------------------------------

    def load(self, loader) -> None:
        try:
            self.base, _, _ = load_settings()
        except S.SettingsError as exc:
            log.error(f"resp2chat: {exc}")  # an error at start-up stops mitmdump (errorcheck)
        for f in S.FIELDS:
            default = "" if f.name in S.SECRET_FIELDS else S.to_option(f, self.base[f.name])
            loader.add_option(f.option, S.option_type(f), default, f.help)
        loader.add_option("resp2chat_raw", bool, False,
                          "Print the model's streamed text, reasoning and tool calls to stdout.")
        loader.add_option("resp2chat_replay_preload", str, "",
                          "Flow file whose completed resp2chat turns preload the replay cache.")
        views.register()

    def configure(self, updated: set[str]) -> None:
        if not any(name.startswith("resp2chat_") for name in updated) and "mode" not in updated:
            return
        try:
            self.settings = self._effective()
        except S.SettingsError as exc:
            raise exceptions.OptionsError(str(exc)) from None
        s = self.settings
        self.lowering = LoweringOptions(
            flatten_content=s["flatten_content"],
            upstream_model=s["upstream_model"] or None,
            model_map=s["model_map"],
            tool_denylist=frozenset(s["tool_denylist"]),
            extra_params=s["upstream_extra_params"],
            drop_params=frozenset(s["drop_upstream_params"]),
            web_search=bool(s["brave_api_key"]),
            model_extra_params=s["model_extra_params"],
            max_tokens_field=s["max_tokens_field"],
            reasoning_effort_map=s["reasoning_effort_map"],
            history_reasoning_field=s["history_reasoning_field"],
            think_tags=s["think_tags"],
        )
        # Derived once here, not per request: what the replay key adds, what is scrubbed.
        self._lowering_repr = repr(self.lowering)
        self.secrets = tuple(v.encode() for k in S.SECRET_FIELDS if len(v := s[k]) >= 6)
        self._configure_upstream(s["upstream_base_url"])
        self._open_request_log(s["upstream_request_log_path"])
        self.replay.resize(s["max_replay_entries"])
        store_config = (s["session_ttl_hours"], s["max_sessions"], s["max_session_memory_mb"], s["session_store_dir"])
        if store_config != self._store_config:
            self._store_config = store_config
            self.store = ResponseStore(ttl=s["session_ttl_hours"] * 3600, max_entries=s["max_sessions"],
                                       max_bytes=s["max_session_memory_mb"] << 20,
                                       directory=s["session_store_dir"] or None)
        self.relay.connect_timeout = s["connect_timeout_secs"] or None
        self.relay.idle_timeout = s["request_timeout_secs"] or float("inf")
        self.relay.keepalive = s["keepalive_secs"] or float("inf")
        self.relay.brave_key, self.relay.brave_base_url = s["brave_api_key"], s["brave_base_url"]
        self.relay.brave_max_results, self.relay.max_search_rounds = s["brave_max_results"], s["max_web_search_rounds"]
        self.relay.verify_tls = not getattr(ctx.options, "ssl_insecure", False)
        if "resp2chat_replay_preload" in updated and ctx.options.resp2chat_replay_preload:
            self._preload(ctx.options.resp2chat_replay_preload)
        self._default_proxy_options()

    def _effective(self) -> dict:
        out = {}
        for f in S.FIELDS:
            value = getattr(ctx.options, f.option)
            if f.name in S.SECRET_FIELDS and not value:
                value = self.base[f.name]
            if f.kind == "map" and isinstance(value, str):
                value = S.coerce(f, value or "{}", f.option)
            elif f.kind == "list":
                value = list(value)
            S.validate(f.name, value)
            out[f.name] = value
        return out

    def _configure_upstream(self, url: str) -> None:
        if url == "demo":
            if self.demo is None:
                from resp2chat_io.demo_upstream import serve_in_thread

                self.demo, demo_url = serve_in_thread()
                log.info(f"resp2chat: serving the bundled demo upstream at {demo_url}")
            host, port = self.demo.server_address[:2]
            url = f"http://{host}:{port}/v1"
        self.upstream = Upstream(url) if url else None

    def _preload(self, path: str) -> None:
        from mitmproxy import io

        try:
            with open(os.path.expanduser(path), "rb") as fh:
                flows = list(io.FlowReader(fh).stream())
        except (OSError, exceptions.FlowReadException) as exc:
            raise exceptions.OptionsError(f"resp2chat_replay_preload: cannot read {path}: {exc}") from None
        loaded = 0
        for f in flows:
            meta = f.metadata.get(META) or {}
            if isinstance(f, http.HTTPFlow) and meta.get("status") == "completed" and f.response:
                created = re.search(rb'"created_at":(\d+)', f.response.content or b"")
                if created and meta.get("response_id"):
                    request = json.loads(meta["responses_request"])
                    loaded += self.replay.put(
                        replay_key(self._cache_context(meta.get("upstream", "")), meta["responses_request"].encode()),
                        pack(meta["response_id"], int(created[1]), f.response.content,
                             stream=request.get("stream") is True, store=request.get("store") is not False))
        log.info(f"resp2chat: replay cache preloaded with {loaded} answers from {path}")

    def _open_request_log(self, path: str) -> None:
        if self.request_log:
            self.request_log.close()
        self.request_log = open(path, "a", buffering=1) if path else None

    def _default_proxy_options(self) -> None:
        """A gateway, not a proxy: lazy upstream connections, bind_addr, reverse mode."""
        opts, changes = ctx.options, {}
        if "connection_strategy" not in opts:
            return  # not inside a proxy (unit tests with a bare options manager)
        if opts.connection_strategy != "lazy":
            changes["connection_strategy"] = "lazy"  # eager would reset clients when upstream is down
        if not opts.store_streamed_bodies:
            changes["store_streamed_bodies"] = True  # flow files keep the translated stream
        if getattr(opts, "server_replay", None) and not (opts.server_replay_ignore_host and opts.server_replay_ignore_port):
            # A recording made against another upstream address must still match.
            changes["server_replay_ignore_host"] = changes["server_replay_ignore_port"] = True
        modes = list(opts.mode)
        if modes == ["regular"]:
            target = urlsplit(self.upstream.url if self.upstream else DEFAULT_UPSTREAM)
            modes = [f"reverse:{target.scheme}://{target.netloc}"]
        # mitmproxy's default listen address (all interfaces, 8080) is a proxy's; a gateway stays
        # on bind_addr. Scripts load after the servers start, so the address goes into the mode
        # spec (`reverse:URL@host:port`): a changed spec is what makes mitmproxy rebind.
        host, port = S.parse_bind(self.settings["bind_addr"])
        if len(modes) == 1:
            spec = mode_specs.ProxyMode.parse(modes[0])
            want = (opts.listen_host or host, opts.listen_port or port)
            if spec.custom_listen_host is None and spec.custom_listen_port is None \
                    and want != (opts.listen_host, opts.listen_port):
                modes = [f"{modes[0]}@{want[0]}:{want[1]}"]
        for m in modes:
            listen = mode_specs.ProxyMode.parse(m).listen_host(opts.listen_host)
            if not S.is_loopback(listen or "0.0.0.0") and not self.settings["gateway_api_key"]:
                raise exceptions.OptionsError(
                    f"resp2chat: listening on {listen or 'all interfaces'} needs gateway_api_key "
                    f"(clients must then send it as a Bearer token); or bind to 127.0.0.1")
        if modes != list(opts.mode):
            changes["mode"] = modes
            self._rebind = True
        if changes:
            opts.update(**changes)

    async def running(self) -> None:
        if not self.relay.port:
            await self.relay.start()
        # mitmdump brings its servers up while scripts are still loading, with the options of
        # that moment: if we changed the mode, ask the proxy server to apply it now.
        if self._rebind and (ps := ctx.master.addons.get("proxyserver")):
            self._rebind = False
            asyncio.ensure_future(ps.setup_servers())

    async def done(self) -> None:
        await self.relay.close()
        if self.demo is not None:
            self.demo.shutdown()
            self.demo.server_close()
            self.demo = None
        if self.request_log:
            self.request_log.close()

    # --- hooks -----------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Refuse an oversized body before mitmproxy reads it (a lying content-length is caught
        # again in `request`, once the body is in).
        size = flow.request.headers.get("content-length", "")
        if size.isdigit() and int(size) > self._body_limit():
            self._too_large(flow)

    def _body_limit(self) -> int:
        return self.settings["max_request_body_mb"] << 20

    def _too_large(self, flow: http.HTTPFlow) -> None:
        flow.response = http.Response.make(413, error_json(
            f"request body larger than max_request_body_mb ({self.settings['max_request_body_mb']} MiB)",
            code="request_too_large"), {**JSON_HEADERS, "connection": "close"})

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.is_replay == "response":
            return
        req = flow.request
        path = req.path.split("?", 1)[0]
        if path == "/healthz":
            flow.response = http.Response.make(200, b'{"status":"ok"}', JSON_HEADERS)
        elif not self._authorized(req):
            flow.response = http.Response.make(401, error_json(
                "missing or wrong gateway API key (send it as 'Authorization: Bearer …')",
                status_type="authentication_error", code="invalid_api_key"), JSON_HEADERS)
        elif path in RESPONSES_PATHS and req.method == "POST":
            if len(req.raw_content or b"") > self._body_limit():
                self._too_large(flow)
            else:
                self._begin(flow)
        elif path.startswith(tuple(p + "/" for p in RESPONSES_PATHS)):
            self._stored(flow, path.rsplit("/", 1)[1])
        elif path.startswith("/v1/"):
            self._to_upstream(flow, path[3:] + req.path[len(path):])

    def _authorized(self, req: http.Request) -> bool:
        key = self.settings["gateway_api_key"]
        if not key:
            return True
        given = req.headers.get("authorization", "").removeprefix("Bearer ").strip()
        given = given or req.headers.get("x-api-key", "")
        return hmac.compare_digest(given.encode(), key.encode())

    def _stored(self, flow: http.HTTPFlow, response_id: str) -> None:
        """GET / DELETE /v1/responses/{id}: the response store."""
        method = flow.request.method
        entry = self.store.get(response_id) if self.store and method in ("GET", "DELETE") else None
        if entry is None:
            status, body = (404, error_json(f"no stored response {response_id!r}", code="response_not_found")) \
                if method in ("GET", "DELETE") else (405, error_json(f"{method} is not supported here"))
        elif method == "GET":
            status, body = 200, json.dumps(entry["response"], ensure_ascii=False).encode()
        else:
            self.store.delete(response_id)
            status, body = 200, json.dumps({"id": response_id, "object": "response", "deleted": True}).encode()
        flow.response = http.Response.make(status, body, JSON_HEADERS)

    def _history(self, response_id: str) -> list | None:
        entry = self.store.get(response_id) if self.store else None
        return entry["items"] if entry else None

    def _begin(self, flow: http.HTTPFlow) -> None:
        body = flow.request.get_content(strict=False) or b""
        meta = flow.metadata[META] = {"responses_request": body.decode("utf-8", "replace")}
        upstream = self.upstream or reverse_target(flow)
        key = replay_key(self._cache_context(upstream.url), body)
        # Server replay answers after this hook and would overwrite a cache answer.
        entry = None if getattr(ctx.options, "server_replay", None) else self.replay.get(key)
        if entry is not None and not entry_flags(entry)[1]:
            # These very bytes were validated and answered before: no parsing, no lowering.
            self._answer_from_cache(flow, entry, "resp_" + uuid.uuid4().hex, int(time.time()))
            return
        try:
            turn = begin_turn(body, self.lowering, "resp_" + uuid.uuid4().hex, int(time.time()), self._history,
                              self.tools_cache)
        except GatewayError as err:
            meta["status"] = "rejected"
            flow.response = http.Response.make(err.status, json.dumps(err.body()), JSON_HEADERS)
            return
        if entry is not None:  # a hit whose response must be stored (previous_response_id)
            self._answer_from_cache(flow, entry, turn.ctx.response_id, turn.ctx.created_at, turn)
            return
        meta["response_id"] = turn.ctx.response_id
        meta["replay_key"] = key
        meta["upstream"] = upstream.url
        flow.request.content = turn.chat_body
        flow.request.headers["content-type"] = "application/json"
        flow.request.headers["accept"] = "text/event-stream"
        flow.request.headers["accept-encoding"] = "identity"  # the translator reads raw bytes
        self._to_upstream(flow, "/chat/completions", upstream)
        if self.relay.port:  # see resp2chat_io/relay.py for why turns take this hop
            flow.request.headers[TARGET_HEADER] = flow.request.url
            if turn.web_search:
                flow.request.headers[WEB_SEARCH_HEADER] = "1"
            flow.request.host, flow.request.port, flow.request.scheme = "127.0.0.1", self.relay.port, "http"
        self.turns[flow.id] = turn
        if self.request_log:  # the body spliced in as sent: byte for byte what the upstream got
            head = json.dumps({"ts": time.time(), "flow": flow.id, "session": session_key(flow),
                               "url": flow.request.pretty_url}, ensure_ascii=False)
            self.request_log.write(f'{head[:-1]}, "body": {turn.chat_body.decode()}}}\n')

    def _to_upstream(self, flow: http.HTTPFlow, path: str, upstream: Upstream | None = None) -> None:
        (upstream or self.upstream or reverse_target(flow)).route(flow, path)
        key = self.settings["upstream_api_key"]
        if key:
            flow.request.headers["authorization"] = f"Bearer {key}"
        elif not self.settings["forward_client_auth"] or self.settings["gateway_api_key"]:
            flow.request.headers.pop("authorization", None)
        flow.request.headers.pop("x-api-key", None)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        turn = self.turns.get(flow.id)
        if turn is None or not turn.client_stream:
            return
        resp = flow.response
        status, ctype = resp.status_code, resp.headers.get("content-type", "")
        translator = turn.translator()
        if ctx.options.resp2chat_raw:
            translator.observer = RawPrinter()
        resp.stream = SSEStream(translator, status, ctype, self.secrets)
        resp.status_code, resp.reason = 200, "OK"
        for name in ("content-length", "content-encoding", "content-type", "transfer-encoding"):
            resp.headers.pop(name, None)
        resp.headers["content-type"] = "text/event-stream; charset=utf-8"
        resp.headers["cache-control"] = "no-cache"
        if flow.request.http_version == "HTTP/1.1":
            resp.headers["transfer-encoding"] = "chunked"

    def response(self, flow: http.HTTPFlow) -> None:
        turn = self.turns.pop(flow.id, None)
        if turn is not None and flow.is_replay != "response":
            upstream_sse = bytes(flow.response.stream.buffer) if isinstance(flow.response.stream, SSEStream) \
                else flow.response.get_content(strict=False) or b""
            if not turn.client_stream:
                self._answer_whole(flow, turn)
            self._record(flow, turn, upstream_sse)
        redact(flow)

    def _cache_context(self, upstream_url: str) -> str:
        return f"{upstream_url}\n{self._lowering_repr}"  # same request, other settings: other answer

    def _record(self, flow: http.HTTPFlow, turn: Turn, upstream_sse: bytes) -> None:
        """Flow metadata (saved with -w), a one-line comment (shown in mitmweb), the cache."""
        t = turn.active
        meta = flow.metadata[META]
        meta["upstream_sse"] = scrub(upstream_sse, self.secrets).decode("utf-8", "replace")
        if t is None:
            return
        final = t.response() if t.done else None
        meta["status"] = status = final["status"] if final else "unfinished"
        meta["usage"] = t.usage
        calls = sum(1 for item in t.output if item["type"] not in ("message", "reasoning"))
        u = t.usage or {}
        took = (flow.response.timestamp_end or time.time()) - flow.request.timestamp_start
        flow.comment = (
            f"{turn.ctx.model} · {status}"
            + (f" ({t.error['code']})" if t.error else "")
            + (f" · in {u['input_tokens']} (cached {u['input_tokens_details']['cached_tokens']})"
               f" out {u['output_tokens']}" if u else "")
            + (f" · {calls} tool call{'s' if calls != 1 else ''}" if calls else "")
            + f" · {took * 1000:.0f} ms"
        )
        answer = bytes(flow.response.stream.sent) if isinstance(flow.response.stream, SSEStream) \
            else flow.response.content
        if status == "completed" and meta.get("replay_key") and answer:
            self.replay.put(meta["replay_key"], pack(turn.ctx.response_id, turn.ctx.created_at, answer,
                                                     stream=turn.client_stream, store=turn.store))
        if status == "completed" and turn.store and self.store is not None:
            self.store.put(turn.ctx.response_id, turn.items + t.output, final)

    def _answer_from_cache(self, flow: http.HTTPFlow, entry: bytes, response_id: str, created_at: int,
                           turn: Turn | None = None) -> None:
        body = unpack_fresh(entry, response_id, created_at)
        stream, store = entry_flags(entry)
        ctype = "text/event-stream; charset=utf-8" if stream else "application/json"
        flow.response = http.Response.make(200, body, {"content-type": ctype, "cache-control": "no-cache"})
        flow.metadata[META].update(replay_cache="hit", response_id=response_id, status="completed")
        flow.comment = f"replay cache hit · {response_id}"
        if turn is not None and store and self.store is not None:  # previous_response_id works after hits
            final = json.loads(body[body.rindex(b"data: ") + 6:] if stream else body)
            final = final.get("response", final)
            self.store.put(response_id, turn.items + final["output"], final)

    def error(self, flow: http.HTTPFlow) -> None:
        turn = self.turns.pop(flow.id, None)
        # Codex hangs up as soon as it has response.completed, which the translator sends at the
        # backend's [DONE], a moment before the upstream body ends: mitmproxy then reports
        # "Client disconnected" instead of a response. The turn happened all the same; record it
        # (status, usage, upstream SSE; replay cache and response store when completed).
        if turn is not None and flow.response is not None and isinstance(flow.response.stream, SSEStream):
            if not flow.response.raw_content:  # mitmproxy stores a streamed body only at its end
                flow.response.raw_content = bytes(flow.response.stream.sent)
            self._record(flow, turn, bytes(flow.response.stream.buffer))
        redact(flow)

    def _answer_whole(self, flow: http.HTTPFlow, turn: Turn) -> None:
        """A non-streaming client: run the same translation over the whole upstream body."""
        resp = flow.response
        t = turn.translator()
        body = resp.get_content(strict=False) or b""
        if resp.status_code != 200:
            t.fail_upstream(resp.status_code, body)
        elif "json" in resp.headers.get("content-type", ""):
            t.translate_body(body)
        else:
            t.feed(body)
            t.finish()
        result = t.response()
        if result["status"] == "failed":
            err = result["error"]
            status = FAILED_STATUS.get(err["code"], 502)
            flow.response = http.Response.make(
                status, error_json(err["message"], status_type="upstream_error", code=err["code"]), JSON_HEADERS)
        else:
            flow.response = http.Response.make(200, json.dumps(result, ensure_ascii=False), JSON_HEADERS)
        flow.response.content = scrub(flow.response.content, self.secrets)

    # --- commands --------------------------------------------------------------------------

    @command.command("resp2chat.settings")
    def show_settings(self) -> str:
        """The effective settings (secrets hidden)."""
        shown = {k: ("[set]" if v else "") if k in S.SECRET_FIELDS else v for k, v in self.settings.items()}
        return json.dumps(shown, indent=2)


addons = [Resp2Chat()]
