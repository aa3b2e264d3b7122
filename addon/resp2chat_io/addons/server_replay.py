"""Offline replay that matches a rerun: ``--server-replay FILE`` with nothing else.

mitmproxy's server replay matches a request on its exact bytes (here, the chat request after
lowering). A rerun of a Codex session that ran a tool never sends the same bytes twice: Codex's
tool output carries the command's wall time and a random chunk id, and its environment context
names today's date. So this addon takes the *turns* of the replayed flow files over and matches
them on ``rerun_key`` (resp2chat_core/replay.py: exactly those three blanked, everything else
byte for byte):

- at start, the turns (HTTP flows and each turn of a WebSocket flow) go into ``Recordings``;
  mitmproxy's server replay keeps only the other flows (``GET /v1/models``…).
- ``request`` (after Turns lowered the request): a recorded answer for this chat request is
  handed to mitmproxy's server replay under this very request (``replay.server.add``), so it
  answers as it would an exact match (``server_replay_refresh``, ``_reuse`` apply). A turn with
  no recording gets ``server_replay_extra``: a status as a ``not_recorded`` error handed over the
  same way, ``kill`` killed: mitmproxy applies the extra itself only while it holds flows (none
  when the files hold only turns), as an empty answer, and would overwrite an answer made here.
  Once the flow has its answer (``response``, or ``error``), the copy handed over leaves
  mitmproxy's list again: with ``server_replay_reuse`` mitmproxy keeps what it answered from, and
  every turn would add one more copy, without bound.
- the WebSocket addon asks ``events`` for each turn on a socket (and each warm-up, so a replayed
  session keeps its recorded response ids) and sends the recorded events.

Recordings are taken in recording order; with ``server_replay_reuse`` they are kept. mitmdump
keeps serving (``keepserving``) until stopped, instead of stopping once mitmproxy's own replay
has nothing left to serve.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from mitmproxy import ctx, exceptions, http

from resp2chat_core.errors import GatewayError
from resp2chat_core.replay import Recordings
from resp2chat_core.routing import CHAT_PATH
from resp2chat_core.websocket import final_response

from .. import flowfile
from .base import JSON_HEADERS, META, SSE_HEADERS, fails_closed, refusal, request_id
from .turns import NOT_RECORDED, UNRECORDED

log = logging.getLogger("resp2chat")

WARMUP = "warm-up"  # recordings of WebSocket warm-ups answer warm-ups only (Recordings kind)


@dataclass
class Answer:
    """A recorded answer: the events (SSE) and/or the whole Response (JSON) the client got."""

    origin: str  # where it was recorded, for the flow's record
    sse: bytes | None = None
    json: bytes | None = None
    response: http.Response | None = None  # the recorded HTTP response, when there is one

    def http(self, stream: bool) -> http.Response | None:
        if self.response is not None and (self.sse is not None) == stream:
            return self.response.copy()
        if stream:
            return http.Response.make(200, self.sse, SSE_HEADERS) if self.sse is not None else None
        if self.json is not None:
            body = self.json
        else:  # the Response object of the recorded stream's last event
            final = final_response(self.sse) if self.sse else None
            body = None if final is None else json.dumps(final, ensure_ascii=False).encode()
        return None if body is None else http.Response.make(200, body, JSON_HEADERS)


def not_recorded(extra: str) -> GatewayError | None:
    """What a turn nothing was recorded for gets under ``server_replay_extra``: None (``forward``:
    the backend answers it), else a ``not_recorded`` error with that status (``kill``: 502)."""
    if extra == "forward":
        return None
    return GatewayError("no recorded answer for this request (server replay)", code=NOT_RECORDED,
                        status=int(extra) if extra.isdigit() else 502, type="server_error")


@fails_closed
class ServerReplay:
    name = "resp2chat_server_replay"

    def __init__(self, turns) -> None:
        self.turns = turns
        self.recordings = Recordings()
        self.loaded: tuple[str, ...] = ()
        self.others: list | None = None  # flows left to mitmproxy's own server replay
        self.handed: dict[str, http.HTTPFlow] = {}  # flow id -> the copy handed to mitmproxy's replay for it

    @property
    def active(self) -> bool:
        return bool(self.loaded)

    def configure(self, updated: set[str]) -> None:
        if "server_replay" not in updated or "server_replay" not in ctx.options:
            return
        paths = tuple(ctx.options.server_replay)
        if paths != self.loaded:
            self.read(paths)

    def read(self, paths: tuple[str, ...]) -> None:
        try:
            flows, cuts = flowfile.read_all(paths)
        except OSError as exc:
            raise exceptions.OptionsError(f"cannot read {exc.filename}: {exc.strerror}") from None
        except exceptions.FlowReadException as exc:
            raise exceptions.OptionsError(str(exc)) from None
        for cut in cuts:  # (a recording cut short: its whole flows are as good as ever)
            log.warning(f"resp2chat: server replay: {cut}")
        self._read_here()
        recordings, others, unread = Recordings(), [], 0
        for f in flows:
            meta = f.metadata.get(META) if isinstance(f, http.HTTPFlow) else None
            if meta is not None and not isinstance(meta, dict):
                unread += 1  # (a record no gateway wrote: edited)
                continue
            meta = meta or {}
            if meta.get("transport") == "websocket":
                turns = meta.get("turns")
                for n, turn in enumerate(turns if isinstance(turns, list) else (), 1):
                    if not isinstance(turn, dict) or turn.get("status") != "completed" or not turn.get("chat_request"):
                        continue
                    if not isinstance(turn["chat_request"], str) or not isinstance(turn.get("events"), str):
                        unread += 1  # (a record no gateway wrote: edited)
                        continue
                    recordings.add(turn["chat_request"].encode(), Answer(f"{f.id} turn {n}", sse=turn["events"].encode()),
                                   WARMUP if turn.get("warmup") else "")
                unread += not isinstance(turns, (list, type(None)))
            elif meta.get("responses_request") and f.response is not None and not meta.get("replay_cache") \
                    and f.request.path.split("?", 1)[0].endswith(CHAT_PATH):
                if not isinstance(meta.get("chat_request") or "", str):
                    unread += 1
                    continue
                content = f.response.content or b""
                stream = f.response.headers.get("content-type", "").startswith("text/event-stream")
                # under the chat request of the turn's first upstream, which is what a rerun lowers
                # (when a fallback answered, the flow shows the body that one got: turns.py)
                chat = meta["chat_request"].encode() if meta.get("chat_request") else f.request.content or b""
                recordings.add(chat, Answer(f.id, sse=content if stream else None,
                                            json=None if stream else content, response=f.response))
            else:
                others.append(f)
        if unread:
            log.warning(f"resp2chat: server replay: {unread} recorded turns left out: their record is not what the "
                        "gateway writes (edited?)")
        self.recordings, self.others, self.loaded = recordings, others, paths
        log.info(f"resp2chat: server replay: {len(recordings)} recorded turns match reruns "
                 f"(tool wall times, chunk ids and the date ignored), {len(others)} other flows")
        if recordings and "keepserving" in ctx.options and not ctx.options.keepserving:
            # mitmdump stops once mitmproxy's own replay has nothing left, which now is only the
            # flows that are no turns: keep serving reruns until stopped.
            ctx.options.update(keepserving=True)
        self.running()

    @staticmethod
    def _read_here() -> None:
        """mitmproxy's own server replay reads the files too, once, and refuses one cut short
        whole. At mitmdump's start it reads them before this script is loaded (a cut file stops
        mitmdump there: ``resp2chat start`` hands it a copy of the whole flows, main.py
        ``whole_replays``); set later (mitmweb, ``set server_replay``), this addon comes first
        (scripts precede it) and tells it they were read: ``running`` hands it the flows that are
        no turns."""
        playback = ctx.master.addons.get("serverplayback") if ctx.master is not None else None
        if playback is not None and hasattr(playback, "configured"):
            playback.configured = True

    def running(self) -> None:
        """mitmproxy's server replay keeps the flows that are no turns (it loads all at start)."""
        if self.others is not None and ctx.master is not None and "replay.server" in ctx.master.commands.commands:
            ctx.master.commands.call("replay.server", self.others)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.is_replay == "response" or not self.active:
            return
        run = self.turns.in_flight.get(flow.id)  # (an HTTP turn's id is its flow's)
        if run is None:
            return  # not a turn: mitmproxy's own server replay (and its server_replay_extra) decides
        answer = self.recordings.take(run.turn.chat_body, ctx.options.server_replay_reuse)
        response = answer.http(run.turn.client_stream) if answer else None
        if response is None:
            # Nothing recorded for it: server_replay_extra decides. mitmproxy applies it only while
            # it holds flows (none when the files hold only turns: the turn went to the backend),
            # and a status as an empty answer: so it is done here (a socket's turn gets the same).
            extra = "kill" if ctx.options.server_replay_kill_extra else ctx.options.server_replay_extra
            if extra == "forward":
                return  # the backend answers
            flow.metadata[META]["server_replay"] = UNRECORDED
            log.warning(f"resp2chat: server replay: no recorded answer for {request_id(flow)} "
                        f"(server_replay_extra={extra})")
            if extra == "kill":  # (by mitmproxy while it holds flows: a flow killed twice is an error)
                if not ctx.master.commands.call("replay.server.count"):
                    flow.kill()
                return
            response = refusal(flow, not_recorded(extra))
        else:
            flow.metadata[META]["server_replay"] = answer.origin
        recorded = flow.copy()
        recorded.response = response
        if "replay.server.add" in ctx.master.commands.commands:
            ctx.master.commands.call("replay.server.add", [recorded])  # it answers, as for an exact match
            self.handed[flow.id] = recorded
        else:
            flow.response, flow.is_replay = response, "response"

    def response(self, flow: http.HTTPFlow) -> None:
        self._take_back(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._take_back(flow)

    def _take_back(self, flow: http.HTTPFlow) -> None:
        """The copy handed over for this flow leaves mitmproxy's replay list (already gone unless
        ``server_replay_reuse``: mitmproxy keeps what answered then). mitmproxy's own list is
        keyed by its hash of the request (``_hash``: mitmproxy 12, pinned below 13)."""
        recorded = self.handed.pop(flow.id, None)
        playback = ctx.master.addons.get("serverplayback") if recorded is not None else None
        if playback is None:
            return
        key = playback._hash(recorded)
        kept = [f for f in playback.flowmap.get(key, ()) if f is not recorded]
        if kept:
            playback.flowmap[key] = kept
        else:
            playback.flowmap.pop(key, None)

    def events(self, chat_body: bytes, warmup: bool = False) -> bytes | None:
        """The recorded events for a WebSocket turn, or warm-up (None: no recording, or not as
        events). A warm-up's recording answers only a warm-up: it holds no answer."""
        if not self.active:
            return None
        answer = self.recordings.take(chat_body, ctx.options.server_replay_reuse, WARMUP if warmup else "")
        return answer.sse if answer is not None else None
