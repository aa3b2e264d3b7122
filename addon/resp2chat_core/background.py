"""Background responses (``background: true``), sans-I/O: what a stored one looks like while it
runs, when it is dead, and the events a resumed stream gets.

Rules of this file:
- Sans-I/O and pure. resp2chat_io/addons/background.py runs the turn in the gateway, off any
  client connection; the response store (memory, its disk copy, Redis) holds it meanwhile, so
  any replica answers a poll (``GET /v1/responses/{id}``).
- A background response is stored at once (``queued``), again while it runs (``in_progress``,
  every ``RENEW_SECS``), and once more when it ends (``completed``, ``incomplete``, ``failed`` or
  ``cancelled``). Each write while it runs carries a *lease* (``until``: the time by which the
  next one is due, ``LEASE_SECS`` ahead) under ``PRIVATE`` in the stored Response, which no
  client sees (``public``). A running response whose lease has passed belongs to a gateway that
  died: whoever reads it sees it ``failed`` (``dead``), never ``in_progress`` forever.
- Cancelling one running elsewhere (another replica) is asked through the store: ``cancel``
  set under ``PRIVATE``; the replica running it reads that at its next renewal and stops the
  backend call. Every write there is over the version read (store.py ``expect``), so a
  renewal never overwrites a cancellation. Whoever waits for it to end meanwhile polls its
  ``brief`` alone (its status, lease and that flag: store.py ``status``), not the whole entry.
- A response created with ``stream: true`` keeps its events (``PRIVATE``'s ``events``, once it
  ended; the running gateway has them live): ``GET /v1/responses/{id}?stream=true&starting_after=N``
  streams those after sequence number ``N`` (``after``). At most ``MAX_EVENTS`` of them: a run
  whose events pass it is stored without them (``ended``), and its gateway holds only the last
  of them while it runs (addons/background.py ``Log``): a resume asking for events no longer
  held is refused (``not_kept``), one error for both. A resume another replica answered while
  the run went on (its 200 gone out) gets, when the run ended without events for it, what a
  request for it would get then as its stream's end (``error_event``, ``without_events``): that
  error, ``not_found`` when it was deleted, ``died`` when its gateway died (a resume of a dead
  one is refused so: its events died with its gateway; ``dead`` keeps that it was streamed).
"""

from __future__ import annotations

import json

from . import response
from .errors import GatewayError, response_error
from .labels import shown

PRIVATE = "_resp2chat_background"  # the stored Response's key for what only gateways read
LEASE_SECS = 10.0  # how long a running response's last write vouches for it
RENEW_SECS = 2.0  # how often the running gateway writes it again (and reads a cancellation)
RUNNING = ("queued", "in_progress")
MAX_EVENTS = 4 << 20  # a streamed response's events kept with it to resume from, at most (bytes)
ORPHANED = "orphaned"  # (under PRIVATE: ``cancelled_here``)
DEAD = {"code": "server_error", "message": "the gateway running this background response stopped before it finished"}
TOO_LARGE = {"code": "response_too_large", "message": "this background response grew larger than the response store "
             "keeps (max_session_memory_mb): it is kept without its output (stopped, if it still ran)"}
# (as a failed Response carries them: errors.response_error, the SDK's code and the gateway's own in type)
DEAD_ERROR, TOO_LARGE_ERROR = response_error(**DEAD), response_error(**TOO_LARGE)


def queued(ctx) -> dict:
    """The Response of a background turn before it ran (``ctx``: its ``TurnContext``)."""
    return json.loads(response.response_json(ctx.response_id, ctx.created_at, "queued", json.dumps(ctx.model),
                                             ctx.echo_json))


def check(raw: dict) -> None:
    """A background request must be stored (it is polled from the store), as OpenAI requires."""
    if raw.get("background") is True and raw.get("store") is False:
        raise GatewayError("background: a background response is kept until it is read, so store cannot be false",
                           param="store", code="invalid_value")


def running(response: dict, now: float, lease: bool = True) -> dict:
    """The Response stored while it runs (``queued`` or ``in_progress``), with its lease."""
    private = dict(response.get(PRIVATE) or {})
    if lease:
        private["until"] = now + LEASE_SECS
    return {**response, PRIVATE: private}


def brief(response: dict) -> dict:
    """What a poll of a stored response reads (store.py ``status``, kept beside each entry): its
    ``status``, whether it is a background one, and under ``PRIVATE`` its lease and whether a
    cancellation was asked; ``is_running``, ``is_dead`` and ``cancel_asked`` read it as they
    read the Response. A few dozen bytes, whatever its conversation, output and events."""
    private = response.get(PRIVATE) or {}
    kept = {key: private[key] for key in ("until", "cancel") if key in private}
    return {"status": response.get("status"), "background": response.get("background") is True,
            **({PRIVATE: kept} if kept else {})}


def is_running(response: dict) -> bool:
    return response.get("status") in RUNNING


def is_dead(response: dict, now: float) -> bool:
    """A running response whose lease has passed: its gateway died."""
    until = (response.get(PRIVATE) or {}).get("until")
    return is_running(response) and isinstance(until, (int, float)) and until < now


def dead(response: dict) -> dict:
    """What a dead running response is: ``failed``, with the reason (stored so, it keeps whether
    it was streamed: a resume of it is told it died, ``without_events``)."""
    streamed = (response.get(PRIVATE) or {}).get("streamed")
    return {**public(response), "status": "failed", "error": DEAD_ERROR,
            **({PRIVATE: {"streamed": True}} if streamed else {})}


def cancelled_here(response: dict) -> dict:
    """What a running response nobody runs any more (dead, or deaf to the cancellation) is once
    a cancellation ends it where it was asked: ``cancelled``; a streamed one says so, and that
    its events went with the gateway that ran it (``ORPHANED``: a resume of it is told why,
    ``without_events``)."""
    streamed = (response.get(PRIVATE) or {}).get("streamed")
    return {**public(response), "status": "cancelled",
            **({PRIVATE: {"streamed": True, ORPHANED: True}} if streamed else {})}


def too_large(response: dict) -> dict:
    """What an ended response the store cannot keep whole is stored as: ``failed``
    (``TOO_LARGE``), without its output (its input items are kept, as when it was queued); a
    streamed one without its events (a resume of it elsewhere is told they were not kept)."""
    streamed = (response.get(PRIVATE) or {}).get("streamed")
    # (nothing of how it ended stays: a completed one's completed_at, an incomplete one's reason)
    ended_so = {key: None for key in ("completed_at", "incomplete_details") if key in response}
    return {**public(response), "status": "failed", "error": TOO_LARGE_ERROR,
            "output": [], **ended_so, **({PRIVATE: {"streamed": True}} if streamed else {})}


def cancel_asked(response: dict) -> bool:
    return bool((response.get(PRIVATE) or {}).get("cancel"))


def ask_cancel(response: dict) -> dict:
    return {**response, PRIVATE: {**(response.get(PRIVATE) or {}), "cancel": True}}


def ended(response: dict, events: bytes | None, whole: bool = True) -> dict:
    """The Response stored once it ended; ``events``: its stream (a streamed one), kept to resume
    (unless larger than ``MAX_EVENTS``, or not ``whole``: its front was dropped while it ran)."""
    if events is None:
        return public(response)
    kept = {"streamed": True} if len(events) > MAX_EVENTS or not whole else {
        "streamed": True, "events": events.decode("utf-8", "replace")}
    return {**response, PRIVATE: kept}


def stored_events(response: dict) -> bytes | None:
    events = (response.get(PRIVATE) or {}).get("events")
    return events.encode() if isinstance(events, str) else None


def public(response: dict) -> dict:
    """The Response as a client sees it."""
    return {k: v for k, v in response.items() if k != PRIVATE} if PRIVATE in response else response


def after(sse: bytes, starting_after: int) -> bytes:
    """The events of ``sse`` (one turn's, each ``event:``/``data:`` and a blank line) whose
    ``sequence_number`` is above ``starting_after``."""
    out = []
    for block in sse.split(b"\n\n"):
        seq = sequence_number(block)
        if seq is not None and seq > starting_after:
            out.append(block + b"\n\n")
    return b"".join(out)


def sequence_number(block: bytes) -> int | None:
    """The ``sequence_number`` of one event (``event:``/``data:``, without its blank line)."""
    at = block.find(b"\ndata: ")
    if at < 0:
        return None
    try:
        seq = json.loads(block[at + 7:]).get("sequence_number")
    except ValueError:
        return None
    return seq if isinstance(seq, int) else None


def not_found(response_id: str) -> GatewayError:
    """A response the store does not hold (never was, expired, or deleted): what a GET of it answers."""
    return GatewayError(f"no stored response {shown(response_id)!r}", code="response_not_found", status=404)


def died() -> GatewayError:
    """A resume of a response whose gateway died (``dead``): its events died with it; ``DEAD``,
    as a GET of it says then."""
    return GatewayError(DEAD["message"], code=DEAD["code"], status=500, type="server_error")


def without_events(response_id: str, response: dict | None, now: float) -> GatewayError:
    """Why a resume of a run that ended (or died) without events cannot stream: as a resume
    asked then is refused, and a followed run of another replica's streams end (their 200
    went out while it ran: ``error_event``):
    ``not_found`` (deleted meanwhile), ``died`` (its gateway died: its lease passed, or a GET
    stored it ``failed`` so), else ``not_kept``."""
    if response is None:
        return not_found(response_id)
    if is_dead(response, now) or response.get("error") == DEAD_ERROR:
        return died()
    if (response.get(PRIVATE) or {}).get(ORPHANED):
        return GatewayError("this background response was cancelled after the gateway running it stopped answering: "
                            "its events went with that gateway; GET it without stream", param="stream",
                            code="invalid_value")
    return not_kept()


def not_kept() -> GatewayError:
    """A resume asking for events not kept (more than ``MAX_EVENTS`` of them)."""
    return GatewayError(f"the events of this response were not kept (past {MAX_EVENTS >> 20} MiB of them: only the "
                        "latest while it runs, none once it ended): GET it without stream", param="stream",
                        code="invalid_value")


def lagged(sequence_number: int, behind: int) -> bytes:
    """The end of a stream whose client fell ``behind`` bytes behind the response's events (it did
    not read them): an ``error`` event (``error_event``); the response runs on."""
    return error_event(GatewayError(f"this stream fell {behind >> 20} MiB behind the response's events (its client "
                                    "did not read them) and was ended: the response runs on; GET it without stream "
                                    "once it ends", code="stream_lagged"), sequence_number)


def error_event(err: GatewayError, sequence_number: int) -> bytes:
    """The end of a resumed stream that cannot go on (``lagged``; ``without_events`` once its 200
    went out: a run of another replica, followed, ended without events for it): an ``error``
    event, numbered after the last one its client got, with OpenAI's fields (``code``,
    ``message``, ``param``) and the Open Responses specification's (``status``, ``error``)."""
    error = {"type": "error", "sequence_number": sequence_number, "status": err.status, **err.body(),
             **{k: err.body()["error"][k] for k in ("code", "message", "param")}}
    return b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n"


def starting_after(query) -> int:
    """``starting_after`` of a resume (-1: from the start); ``GatewayError`` for a bad one."""
    value = query.get("starting_after")
    if value is None:
        return -1
    try:  # (ASCII digits only: str.isdigit takes "²" and "١" too; int() refuses past 4300 digits)
        if value.isascii() and value.isdigit():
            return int(value)
    except ValueError:
        pass
    raise GatewayError("starting_after: a sequence number (an integer from 0)", param="starting_after",
                       code="invalid_value")
