"""Background responses (issue 24 item 11), with the openai SDK through a real mitmdump: queued at
once, polled to the end, cancelled (the backend call closed), streamed and resumed from a
sequence number, polled on another replica sharing Redis, and a gateway that dies mid-turn
leaving the response ``failed``, never ``in_progress`` forever (resp2chat_core/background.py)."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import threading
import time

import openai
import pytest
import requests

from helpers import (
    Endless, KiB, LocalServer, MiB, QuietHandler, chat_chunk, chat_event, chat_sse, check_stream, http_chunk, iter_sse,
    memory, openai_client, parse_sse, read_flows, send_sse, start_gateway, start_sse, wait_until,
)
from resp2chat_core.background import LEASE_SECS, MAX_EVENTS
from resp2chat_io.addons.background import LAG, LAG_SECS

SLOW = "noreason\nwords: 40\nslow: 100"  # (the demo upstream: 40 words, 0.1 s apart: ~4 s)


def poll(client, response_id: str, timeout: float = 30):
    """GET /v1/responses/{id} until it is no longer queued or in progress."""
    def ended():
        r = client.responses.retrieve(response_id)
        return r if r.status not in ("queued", "in_progress") else None
    return wait_until(ended, timeout, f"{response_id} polled to its end")


def test_queued_at_once_then_polled_to_its_end(upstream, gateway_factory):
    gw = gateway_factory(upstream.origin)
    client = openai_client(gw)
    queued = client.responses.create(model="demo-model", input=SLOW, background=True)
    assert queued.status == "queued" and queued.background is True
    assert client.responses.retrieve(queued.id).status in ("queued", "in_progress")  # (the backend takes ~4 s)
    done = poll(client, queued.id)
    assert done.status == "completed" and done.output_text.split() == [f"word{i}" for i in range(40)]
    assert done.background is True and done.usage.output_tokens > 0
    # a stored response like any other: it continues
    later = client.responses.create(model="demo-model", previous_response_id=queued.id, input="and now?")
    assert later.output_text == "You said: and now?"


def test_background_needs_store_and_http(upstream, gateway_factory):
    gw = gateway_factory(upstream.origin)
    client = openai_client(gw)
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="demo-model", input="hi", background=True, store=False)
    assert err.value.body["param"] == "store"
    from wsclient import WSClient

    ws = WSClient(gw.base_url)
    [error] = ws.turn({"type": "response.create", "model": "demo-model", "input": "hi", "background": True})
    ws.close()
    assert error["type"] == "error" and error["error"]["param"] == "background"


def test_cancel_stops_the_backend_call(endless, gateway_factory):
    gw = gateway_factory(endless.url)
    client = openai_client(gw)
    queued = client.responses.create(model="m", input="go on forever", background=True)
    wait_until(lambda: Endless.started, 10, "the backend call")
    with pytest.raises(openai.BadRequestError):  # (a running background response is no history yet)
        client.responses.create(model="m", previous_response_id=queued.id, input="next")
    cancelled = client.responses.cancel(queued.id)
    assert cancelled.status == "cancelled" and cancelled.id == queued.id
    wait_until(lambda: Endless.closed, 10, "the backend call closed")
    assert client.responses.retrieve(queued.id).status == "cancelled"
    assert client.responses.cancel(queued.id).status == "cancelled"  # (again: as it ended)


def test_cancel_refusals(upstream, gateway_factory):
    gw = gateway_factory(upstream.origin)
    client = openai_client(gw)
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_nowhere")
    plain = client.responses.create(model="demo-model", input="hi")
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(plain.id)
    assert requests.get(f"{gw.base_url}/responses/{plain.id}/cancel", timeout=10).status_code == 405


def test_a_streamed_background_response_goes_on_without_its_client_and_resumes(upstream, gateway_factory):
    gw = gateway_factory(upstream.origin)
    client = openai_client(gw)
    stream = client.responses.create(model="demo-model", input=SLOW, background=True, stream=True)
    seen = []
    for event in stream:
        seen.append(event)
        if event.type == "response.output_text.delta":
            break
    stream.close()  # the client goes away: the response runs on
    response_id, last = seen[0].response.id, seen[-1].sequence_number
    done = poll(client, response_id)
    assert done.status == "completed" and len(done.output_text.split()) == 40
    resumed = list(client.responses.retrieve(response_id, stream=True, starting_after=last))
    assert [e.sequence_number for e in resumed] == list(range(last + 1, last + 1 + len(resumed)))
    assert resumed[-1].type == "response.completed"
    deltas = [e.delta for e in seen + resumed if e.type == "response.output_text.delta"]
    assert "".join(deltas).split() == [f"word{i}" for i in range(40)]
    # raw: the resumed stream is SSE ending with [DONE]; a bad starting_after is a 400
    raw = requests.get(f"{gw.base_url}/responses/{response_id}?stream=true&starting_after={last}", timeout=30)
    assert raw.content.endswith(b"data: [DONE]\n\n") and parse_sse(raw.content)[0]["sequence_number"] == last + 1
    assert requests.get(f"{gw.base_url}/responses/{response_id}?stream=true&starting_after=x",
                        timeout=10).status_code == 400


def test_resuming_while_it_runs_streams_the_rest_live(upstream, gateway_factory):
    gw = gateway_factory(upstream.origin)
    client = openai_client(gw)
    stream = client.responses.create(model="demo-model", input=SLOW, background=True, stream=True)
    first = next(iter(stream))
    stream.close()
    resumed = client.responses.retrieve(first.response.id, stream=True, starting_after=first.sequence_number)
    events = list(resumed)
    assert events[0].sequence_number == first.sequence_number + 1 and events[-1].type == "response.completed"
    unstreamed = client.responses.create(model="demo-model", input="hi", background=True)
    with pytest.raises(openai.BadRequestError):  # (created without stream: there are no events to resume)
        list(client.responses.retrieve(unstreamed.id, stream=True))


def test_any_replica_answers_the_poll_and_a_dead_one_leaves_it_failed(upstream, tmp_path, redis_server):
    a, b = [start_gateway(upstream.origin, tmp_path, "--set", f"resp2chat_state_store_url={redis_server.url}")
            for _ in range(2)]
    try:
        on_a, on_b = openai_client(a), openai_client(b)
        queued = on_a.responses.create(model="demo-model", input="noreason\nwords: 10\nslow: 50", background=True)
        assert on_b.responses.retrieve(queued.id).status in ("queued", "in_progress")
        assert poll(on_b, queued.id).output_text.split() == [f"word{i}" for i in range(10)]
        # a replica that dies mid-turn: the other sees it failed once its lease passed, never in_progress forever
        slow = on_a.responses.create(model="demo-model", input="noreason\nwords: 400\nslow: 100", background=True)
        wait_until(lambda: on_b.responses.retrieve(slow.id).status == "in_progress", 10, "it runs")
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
        died = time.monotonic()
        failed = poll(on_b, slow.id, LEASE_SECS + 10)
        assert failed.status == "failed" and failed.error.code == "server_error" and time.monotonic() - died < LEASE_SECS + 10
        assert on_b.responses.retrieve(slow.id).status == "failed"
        # a cancellation asked on one replica stops the run of another
        c = start_gateway(upstream.origin, tmp_path, "--set", f"resp2chat_state_store_url={redis_server.url}")
        try:
            running = openai_client(c).responses.create(model="demo-model", input="noreason\nwords: 400\nslow: 100",
                                                        background=True)
            wait_until(lambda: on_b.responses.retrieve(running.id).status == "in_progress", 10, "it runs")
            assert on_b.responses.cancel(running.id).status == "cancelled"
            assert openai_client(c).responses.retrieve(running.id).status == "cancelled"
        finally:
            c.stop()
    finally:
        a.stop()
        b.stop()


def test_runs_ended_elsewhere_while_their_replica_stalled_stay_ended(upstream, gateway_factory, redis_server):
    """Replica A runs two background responses and stalls (SIGSTOP) past their lease: replica B
    takes them for dead, and a cancellation there stores them ``cancelled``. When A comes back,
    each run reads that it ended (the one still running at its renewal, the one whose backend
    answered meanwhile as it ends) and leaves it so: GETs and a second cancellation answer
    ``cancelled``, as the first did. A's renewal stored one ``in_progress`` again over the
    cancellation, and the ends of both stored them ``completed``."""
    a, b = [gateway_factory(upstream.origin, "--set", f"resp2chat_state_store_url={redis_server.url}")
            for _ in range(2)]
    on_a, on_b = openai_client(a), openai_client(b)
    ids = [on_a.responses.create(model="demo-model", input=f"noreason\nwords: {words}\nslow: 50", background=True).id
           for words in (100, 800)]  # (~5 s: its backend answers while A stalls; ~40 s: it runs on after)
    wait_until(lambda: {on_b.responses.retrieve(i).status for i in ids} == {"in_progress"}, 10, "they run")
    a.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(LEASE_SECS + 1)
        assert [on_b.responses.cancel(i).status for i in ids] == ["cancelled"] * 2
    finally:
        a.proc.send_signal(signal.SIGCONT)
    seen = set()
    for _ in range(12):  # (A's renewals come within RENEW_SECS)
        seen |= {(i, on_b.responses.retrieve(i).status) for i in ids}
        time.sleep(0.25)
    assert seen == {(i, "cancelled") for i in ids}, seen
    assert [(on_a.responses.cancel(i).status, on_a.responses.retrieve(i).status) for i in ids] == \
        [("cancelled", "cancelled")] * 2


def test_a_cancellation_from_another_replica_writes_the_response_alone(endless, gateway_factory, redis_server):
    """Replica A runs a background response with a large conversation; B is asked to cancel it:
    B asks A through the store with a renewal (store.py ``renew``: the Response alone, under the
    version check), not a whole ``put`` of the conversation. Watched in Redis (MONITOR) while A
    is stopped, so that every write is B's: none carries the conversation. A then stops the run
    at its next renewal, the cancellation answers ``cancelled``, and the conversation is intact
    on either replica."""
    import hashlib

    from resp2chat_io.redis_state import _PUT_RESPONSE, _RENEW_RESPONSE

    a, b = [gateway_factory(endless.url, "--set", f"resp2chat_state_store_url={redis_server.url}")
            for _ in range(2)]
    on_a, on_b = openai_client(a), openai_client(b)
    marker = "conversation-marker-" + "x" * 200_000
    given = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": marker}]},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "go on forever"}]}]
    queued = on_a.responses.create(model="m", input=given, background=True)
    wait_until(lambda: Endless.started, 10, "the backend call")
    wait_until(lambda: on_b.responses.retrieve(queued.id).status == "in_progress", 10, "it runs")
    time.sleep(2.5)  # (a renewal of A's went: the entry is as renewals leave it)
    renew_sha, put_sha = (hashlib.sha1(text.encode()).hexdigest() for text in (_RENEW_RESPONSE, _PUT_RESPONSE))
    seen: list[dict] = []
    watching, listening = threading.Event(), threading.Event()
    watching.set()

    def watch():
        with redis_server.client().monitor() as m:  # (MONITOR answered: every command from now on is seen)
            listening.set()
            for command in m.listen():
                if not watching.is_set():
                    return
                seen.append(command)

    def scripts() -> list[str]:
        return [c["command"] for c in list(seen) if c["command"].upper().startswith("EVALSHA")]

    watcher = threading.Thread(target=watch, daemon=True)
    answer: list = []
    a.proc.send_signal(signal.SIGSTOP)
    try:
        watcher.start()
        assert listening.wait(10)
        asking = threading.Thread(target=lambda: answer.append(on_b.responses.cancel(queued.id)), daemon=True)
        asking.start()
        # (B reads it and asks, in one write; A, stopped, hears nothing yet: well within its lease)
        wait_until(lambda: any(renew_sha in c or put_sha in c for c in scripts()), 6, "B's write")
    finally:
        a.proc.send_signal(signal.SIGCONT)
    watching.clear()
    asking.join(30)
    assert answer and answer[0].status == "cancelled", answer
    scripts = scripts()
    assert any(renew_sha in c for c in scripts), scripts  # B's ask went as a renewal…
    assert not any(put_sha in c or "conversation-marker" in c for c in scripts), [c[:200] for c in scripts]
    wait_until(lambda: Endless.closed, 10, "the backend call closed")
    for client in (on_a, on_b):
        assert client.responses.retrieve(queued.id).status == "cancelled"
        listed = client.responses.input_items.list(queued.id, order="asc")
        assert [item.content[0].text for item in listed.data] == [marker, "go on forever"]


def redis_traffic(r) -> tuple[int, int, int]:
    """What Redis has sent and received in all (bytes), and the commands it ran (each poll is one)."""
    stats = r.info("stats")
    calls = sum(v["calls"] for v in r.info("commandstats").values())
    return stats["total_net_output_bytes"], stats["total_net_input_bytes"], calls


def large_given(marker: str, ask: str) -> list[dict]:
    return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": marker}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": ask}]}]


def test_a_cancellation_waiting_on_another_replica_polls_the_status_alone(endless, gateway_factory, redis_server):
    """Replica B is asked to cancel a streamed run of replica A whose conversation is large
    (300 KB), which a client of B's follows (a resume: B's follower): B asks A through the store,
    then waits for A to stop the run, polling the store every ``POLL``, as its follower does. A
    poll reads the response's status alone (store.py ``status``: a small field), not the whole
    entry: watched in Redis (INFO: bytes sent, commands run) while A is stopped (SIGSTOP, well
    within its lease), so every command is B's. Before, each poll read the whole entry (~300 KB,
    four times a second, each). The follower's client gets the run's end."""
    a, b = [gateway_factory(endless.url, "--set", f"resp2chat_state_store_url={redis_server.url}")
            for _ in range(2)]
    on_a, on_b = openai_client(a), openai_client(b)
    marker = "conversation-marker-" + "x" * 300_000
    created = requests.post(f"{a.base_url}/responses", stream=True, timeout=30, json={
        "model": "m", "input": large_given(marker, "go on forever"), "background": True, "stream": True})
    queued = on_a.responses.retrieve(next(iter_sse(created))["response"]["id"])
    created.close()  # (the run goes on)
    wait_until(lambda: Endless.started, 10, "the backend call")
    wait_until(lambda: on_b.responses.retrieve(queued.id).status == "in_progress", 10, "it runs")
    following = requests.get(f"{b.base_url}/responses/{queued.id}?stream=true", stream=True, timeout=60)
    assert following.status_code == 200, following.text
    time.sleep(2.5)  # (a renewal of A's went: the entry is as renewals leave it)
    r, key = redis_server.client(), f"resp2chat:response:{queued.id}"
    answer: list = []
    a.proc.send_signal(signal.SIGSTOP)
    try:
        asking = threading.Thread(target=lambda: answer.append(on_b.responses.cancel(queued.id)), daemon=True)
        asking.start()
        wait_until(lambda: b'"cancel":true' in (r.hget(key, "tail") or b""), 5, "B asks A to stop")
        sent, _, calls = redis_traffic(r)
        time.sleep(2)
        sent_after, _, calls_after = redis_traffic(r)
    finally:
        a.proc.send_signal(signal.SIGCONT)
    asking.join(30)
    assert answer and answer[0].status == "cancelled", answer
    polls = calls_after - calls - 2  # (INFO's own)
    print(f"B's polls in 2 s: {polls}, {sent_after - sent} bytes sent by Redis")
    assert polls >= 8, polls  # (POLL: 0.25 s, the cancellation's and the follower's)
    assert sent_after - sent < 16 * KiB, f"{sent_after - sent} bytes read in {polls} polls"
    assert parse_sse(following.content)[-1]["type"] == "response.cancelled"
    assert on_a.responses.retrieve(queued.id).status == "cancelled"
    assert [i.content[0].text for i in on_b.responses.input_items.list(queued.id, order="asc").data] == \
        [marker, "go on forever"]


def test_a_run_whose_replica_died_is_ended_elsewhere_without_its_conversation_written_again(
        upstream, gateway_factory, redis_server):
    """Replica A runs two background responses with a large conversation (300 KB) and dies
    (SIGKILL); past their lease, replica B ends one with a cancellation (``cancelled``) and the
    other with a GET (``failed``, ``server_error``). Each is written there as a renewal (store.py
    ``renew(…, ended=True)``: its Response and output alone, the output indexed as a ``put``
    indexes it), not a whole ``put`` that sent the conversation to Redis again: watched as the
    bytes Redis received. What A's renewals stored of each run's output (a finished reasoning
    item) is kept, and an ``item_reference`` to it resolves afterwards; the conversation is
    intact."""
    a, b = [gateway_factory(upstream.origin, "--set", f"resp2chat_state_store_url={redis_server.url}")
            for _ in range(2)]
    on_a, on_b = openai_client(a), openai_client(b)
    marker = "conversation-marker-" + "x" * 300_000
    ids = [on_a.responses.create(model="demo-model", input=large_given(marker, f"words: 400\nslow: 100\n{n}"),
                                 background=True).id for n in range(2)]

    def reasoned(rid: str):  # (a renewal stored the reasoning item, finished: the answer's words go on)
        found = on_b.responses.retrieve(rid)
        return found.status == "in_progress" and [o for o in found.output if o.type == "reasoning"]
    held = [wait_until(lambda rid=rid: reasoned(rid), 15, "a renewal with the reasoning item")[0] for rid in ids]
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    time.sleep(LEASE_SECS + 1)
    r = redis_server.client()
    _, received, _ = redis_traffic(r)
    assert on_b.responses.cancel(ids[0]).status == "cancelled"
    _, cancelled, _ = redis_traffic(r)
    key, version = f"resp2chat:response:{ids[1]}", int(r.hget(f"resp2chat:response:{ids[1]}", "v"))
    assert on_b.responses.retrieve(ids[1]).status == "failed"
    wait_until(lambda: int(r.hget(key, "v")) > version, 10, "the GET's write")
    _, failed, _ = redis_traffic(r)
    print(f"bytes Redis received: the cancellation {cancelled - received}, the GET {failed - cancelled}")
    assert cancelled - received < 64 * KiB and failed - cancelled < 64 * KiB, (cancelled - received, failed - cancelled)
    for rid, item, status in zip(ids, held, ("cancelled", "failed")):
        ended = on_b.responses.retrieve(rid)
        assert ended.status == status and [o.id for o in ended.output] == [item.id]
        assert [i.content[0].text for i in on_b.responses.input_items.list(rid, order="asc").data][0] == marker
        go_on = on_b.responses.create(model="demo-model", input=[{"type": "item_reference", "id": item.id},
                                                                 {"role": "user", "content": "noreason\nand?"}])
        assert go_on.status == "completed"


def test_a_run_that_ends_on_its_replica_stores_its_end_without_its_conversation_written_again(
        upstream, gateway_factory, redis_server):
    """A background response continuing a stored one whose conversation is large (300 KB) runs
    and ends on its replica: its end is written as a renewal that ends it (store.py ``renew(…,
    ended=True)``: its Response and output alone, the output indexed as a ``put`` indexes it),
    not a whole ``put`` that sent the conversation to Redis again (it went once, when it was
    queued): watched as the bytes Redis received from while it runs to its end. A later turn
    continuing it (``previous_response_id``) still gets the whole conversation, its output
    included, and an ``item_reference`` to its output resolves."""
    gw = gateway_factory(upstream.origin, "--set", f"resp2chat_state_store_url={redis_server.url}")
    client = openai_client(gw)
    marker = "conversation-marker-" + "x" * 300_000
    first = client.responses.create(model="demo-model", input=large_given(marker, "noreason\nwords: 3"))
    queued = client.responses.create(model="demo-model", previous_response_id=first.id, background=True,
                                     input="noreason\nwords: 30\nslow: 100")
    wait_until(lambda: client.responses.retrieve(queued.id).status == "in_progress", 10, "it runs")
    r = redis_server.client()
    _, received, _ = redis_traffic(r)
    ended = poll(client, queued.id)
    _, stored, _ = redis_traffic(r)
    print(f"bytes Redis received from its run to its end: {stored - received}")
    assert ended.status == "completed", ended
    assert stored - received < 64 * KiB, stored - received
    answer = ended.output[-1]
    listed = [i for i in client.responses.input_items.list(queued.id, order="asc").data]
    assert listed[0].content[0].text == marker and len(listed) == 4, [i.type for i in listed]
    upstream.clear()
    later = client.responses.create(model="demo-model", previous_response_id=queued.id, input="noreason\nand?")
    assert later.status == "completed"
    sent = json.dumps(upstream.requests()[-1])
    assert marker in sent and ended.output_text in sent and "words: 30" in sent, sent[-2000:]
    go_on = client.responses.create(model="demo-model", input=[{"type": "item_reference", "id": answer.id},
                                                               {"role": "user", "content": "noreason\nand?"}])
    assert go_on.status == "completed"


def test_a_run_that_names_a_conversation_leaves_its_items_there(upstream, gateway_factory, redis_server):
    """A background turn naming a conversation (the Conversations API), on a gateway sharing
    Redis: once it ended on its replica (its end a renewal that ends it, not a ``put``), the
    conversation holds its input and output, and a later turn of the conversation sees them."""
    client = openai_client(gateway_factory(upstream.origin, "--set", f"resp2chat_state_store_url={redis_server.url}"))
    conv = client.conversations.create(items=[{"type": "message", "role": "user", "content": "noreason\nwords: 2"}])
    queued = client.responses.create(model="demo-model", conversation=conv.id, background=True,
                                     input="noreason\nwords: 20\nslow: 50")
    ended = poll(client, queued.id)
    assert ended.status == "completed", ended
    listed = client.conversations.items.list(conv.id, order="asc").data
    assert [i.type for i in listed] == ["message"] * 3 and listed[-1].id == ended.output[-1].id, listed
    upstream.clear()
    later = client.responses.create(model="demo-model", conversation=conv.id, input="noreason\nand?")
    assert later.status == "completed"
    assert ended.output_text in json.dumps(upstream.requests()[-1])


def test_a_gateway_that_stops_leaves_it_failed_on_disk(upstream, gateway_factory, tmp_path):
    args = ("--set", f"resp2chat_session_store_dir={tmp_path / 'store'}")
    gw = gateway_factory(upstream.origin, *args)
    client = openai_client(gw)
    running = client.responses.create(model="demo-model", input="noreason\nwords: 400\nslow: 100", background=True)
    wait_until(lambda: client.responses.retrieve(running.id).status == "in_progress", 10, "it runs")
    gw.stop()  # (SIGTERM: it ends what runs as failed)
    again = openai_client(gateway_factory(upstream.origin, *args))
    stopped = again.responses.retrieve(running.id)
    assert stopped.status == "failed" and stopped.error.code == "server_error"


def test_a_streamed_background_response_is_created_queued(upstream, gateway_factory):
    """OpenAI (and the Open Responses spec's state machine: ``queued`` → ``in_progress``, a
    ``response.in_progress`` event at that change): a background response is created
    ``queued``, its stream opening with ``response.created`` and ``response.queued`` (status
    ``queued``), then ``response.in_progress`` once it runs, as the JSON body of one created
    without ``stream`` says ``queued``. The gateway's stream said ``in_progress`` from its first
    event. The openai SDK reads each (``ResponseQueuedEvent``); a resume from the start reads the
    same."""
    gw = gateway_factory(upstream.origin)
    client = openai_client(gw)
    events = list(client.responses.create(model="demo-model", input="hi", background=True, stream=True))
    assert [(e.type, e.response.status) for e in events[:3]] == [
        ("response.created", "queued"), ("response.queued", "queued"), ("response.in_progress", "in_progress")]
    assert type(events[1]).__name__ == "ResponseQueuedEvent" and events[-1].type == "response.completed"
    assert events[0].response.output == [] and events[0].response.background is True
    raw = requests.post(f"{gw.base_url}/responses", timeout=30,
                        json={"model": "demo-model", "input": "hi", "background": True, "stream": True}).content
    check_stream(raw, parse_sse(raw)[0]["response"]["id"])  # (the stream's invariants: helpers)
    resumed = list(client.responses.retrieve(events[0].response.id, stream=True))
    assert [e.model_dump() for e in resumed] == [e.model_dump() for e in events]


def test_a_cancelled_response_closes_the_item_it_was_writing_incomplete(endless, gateway_factory):
    """Cancelled mid-answer, the message the model was writing did not complete: it is closed
    ``incomplete`` (as OpenAI's Realtime API closes a cancelled response's items; the spec's
    only status for an item whose sampling stopped), in the stream's ``output_item.done`` and
    in the cancelled Response (the cancel's answer, a GET). The gateway said ``completed``."""
    gw = gateway_factory(endless.url)
    client = openai_client(gw)
    stream = client.responses.create(model="m", input="go on forever", background=True, stream=True)
    events = []
    for event in stream:
        events.append(event)
        if event.type == "response.output_text.delta":
            break
    cancelled = client.responses.cancel(events[0].response.id)
    events += list(stream)  # (the rest of the stream: the item closed, the response cancelled)
    assert cancelled.status == "cancelled"
    [message] = cancelled.output
    assert (message.type, message.status) == ("message", "incomplete") and message.content[0].text
    [done] = [e.item for e in events if e.type == "response.output_item.done"]
    assert done.model_dump() == message.model_dump()
    assert client.responses.retrieve(cancelled.id).output[0].status == "incomplete"


def test_resumes_on_another_replica_share_one_follower_that_stops_when_its_clients_leave(
        upstream, gateway_factory, redis_server):
    """``GET /v1/responses/{id}?stream=true`` on replica A of a background response that replica
    B runs: A follows it in Redis (a read every ``POLL``) until it ends. The clients following
    it there share one follower, which stops once the last of them left: 40 clients that ask and
    hang up leave no reads behind (each left a task polling Redis ~4 times a second for as long
    as the run lasted: 22 commands/s before, 169 after), two that stay cost one follower's
    reads, and both get the run's events once it ends (here: cancelled on B)."""
    gws = [gateway_factory(upstream.origin, "--set", f"resp2chat_state_store_url={redis_server.url}")
           for _ in range(2)]
    r = requests.post(f"{gws[1].base_url}/responses", json={
        "model": "demo-model", "input": "noreason\nwords: 2000\nslow: 50", "background": True, "stream": True},
        stream=True, timeout=30)
    first = next(line for line in r.iter_lines() if line.startswith(b"data:"))
    rid = json.loads(first[5:])["response"]["id"]
    r.close()  # (the run goes on)
    db = redis_server.client()

    def rate(secs: float = 3.0) -> float:
        start = db.info("stats")["total_commands_processed"]
        time.sleep(secs)
        return (db.info("stats")["total_commands_processed"] - start - 2) / secs

    time.sleep(1)
    baseline = rate()
    for _ in range(40):
        follower = requests.get(f"{gws[0].base_url}/responses/{rid}?stream=true", stream=True, timeout=10)
        assert follower.status_code == 200, follower.text
        follower.close()  # the client hangs up at once
    time.sleep(1)
    left = rate()
    staying = [requests.get(f"{gws[0].base_url}/responses/{rid}?stream=true", stream=True, timeout=30)
               for _ in range(2)]
    assert [s.status_code for s in staying] == [200, 200]
    time.sleep(1)
    held = rate()
    assert requests.post(f"{gws[1].base_url}/responses/{rid}/cancel", timeout=30).json()["status"] == "cancelled"
    got = [s.content for s in staying]
    assert left < baseline + 2, f"Redis commands/s: {baseline:.0f} before, {left:.0f} after 40 clients came and left"
    # (one follower reads ~4 times a second: two would be twice that)
    assert held < left + 6, f"Redis commands/s: {left:.0f} without clients, {held:.0f} with 2 following"
    for raw in got:
        assert raw.endswith(b"data: [DONE]\n\n") and parse_sse(raw)[-1]["type"] == "response.cancelled", raw[-300:]


class Bulky(QuietHandler):
    """A chat backend answering 2 MiB of text, in 32 chunks."""

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        send_sse(self, chat_sse(*[chat_chunk({"content": "x" * (64 << 10)}) for _ in range(32)],
                                chat_chunk(finish="stop")))


def test_a_background_response_created_without_stream_leaves_no_events_behind(gateway_factory):
    """A background response created without ``stream`` can never be streamed (a resume is a
    400): its events are not kept, while it runs nor once it ended. They were: its ``Log``
    collected every event (a 2 MiB answer: ~12 MiB of them, the text in the deltas and again in
    each ``.done`` and in ``response.completed``), and the last 64 runs' logs stayed in the
    gateway after they ended, deleted or not: 24 such runs, each polled to its end and deleted,
    left it holding ~300 MiB more (up to ~770 MiB at 64). Now about what it held before (what
    a turn leaves to the next full garbage collection: some 40-130 MiB here)."""
    with LocalServer(Bulky) as backend:
        # (blocks of 128 KiB and more are mapped and unmapped: RSS follows what is freed)
        gw = gateway_factory(backend.url, "--set", "resp2chat_max_replay_entries=0",
                             env={"MALLOC_MMAP_THRESHOLD_": "131072"})
        client = openai_client(gw)

        def one() -> None:
            queued = client.responses.create(model="m", input="a long answer", background=True)
            done = poll(client, queued.id)
            assert done.status == "completed" and len(done.output_text) == 2 * MiB
            client.responses.delete(queued.id)

        for _ in range(4):  # (what the first turns allocate once)
            one()
        time.sleep(1)
        base = memory(gw.proc.pid)["VmRSS"]
        for _ in range(24):
            one()
        time.sleep(1)
        grown = memory(gw.proc.pid)["VmRSS"] - base
        print("GROWN0", grown / MiB)
        print("GROWN", grown / MiB)
        unstreamed = client.responses.create(model="m", input="one more", background=True)
        with pytest.raises(openai.BadRequestError):  # (never streamed: nothing to resume)
            list(client.responses.retrieve(unstreamed.id, stream=True))
    assert grown < 192 * MiB, f"24 ended, deleted background responses left the gateway holding {grown / MiB:.0f} MiB more"


class Sized(QuietHandler):
    """A chat backend answering the ``kib: N`` the request asks for: N KiB of text in 64 KiB
    chunks, then ``end.``; one that asks ``pause`` waits for ``go`` before that end (``sent``
    says it got there)."""

    sent = threading.Event()
    go = threading.Event()

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        start_sse(self)
        for _ in range(int(re.search(rb"kib: (\d+)", body)[1]) // 64):
            self.wfile.write(http_chunk(chat_event({"content": "x" * (64 << 10)})))
        self.wfile.flush()
        if b"pause" in body:
            type(self).sent.set()
            type(self).go.wait(120)
        self.wfile.write(http_chunk(chat_event({"content": "end."}) + chat_event(finish="stop") + b"data: [DONE]\n\n"))
        self.wfile.write(http_chunk(b""))


class Thoughtful(QuietHandler):
    """A chat backend that reasons 1.5 MiB, starts its answer (the reasoning item is done: the
    Response's output holds it), then waits for ``go`` (``sent``: it got there), then ends."""

    sent = threading.Event()
    go = threading.Event()

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        start_sse(self)
        for _ in range(24):
            self.wfile.write(http_chunk(chat_event({"reasoning_content": "r" * (64 << 10)})))
        self.wfile.write(http_chunk(chat_event({"content": "the answer"})))
        self.wfile.flush()
        type(self).sent.set()
        type(self).go.wait(120)
        with contextlib.suppress(OSError):  # (the gateway hung up: the run was stopped)
            self.wfile.write(http_chunk(chat_event(finish="stop") + b"data: [DONE]\n\n"))
            self.wfile.write(http_chunk(b""))


def test_a_run_that_grows_past_the_store_ends_failed_response_too_large(gateway_factory):
    """A background run whose output grows past what the store keeps (``max_session_memory_mb``
    1: the backend reasons 1.5 MiB, starts its answer, then waits) is stopped at its next
    renewal: its stream ends ``response.failed`` (``response_too_large``), a GET and a resume
    say so, it is stored without its output, and nothing stays ``in_progress``. (It ran on
    until the backend's silence timed it out: a renewal wrote the running Response without its
    output, ``[]`` as a running Response's events carry it, so the bound never saw it grow.)"""
    Thoughtful.sent.clear()
    Thoughtful.go.clear()
    with LocalServer(Thoughtful) as backend:
        gw = gateway_factory(backend.url, "--set", "resp2chat_max_session_memory_mb=1",
                             "--set", "resp2chat_max_replay_entries=0")
        client = openai_client(gw)
        try:
            created = requests.post(f"{gw.base_url}/responses", timeout=60, stream=True, json={
                "model": "m", "input": "think long", "background": True, "stream": True})
            assert created.status_code == 200, created.text
            events = list(iter_sse(created))
            assert Thoughtful.sent.is_set()  # (it went past the bound while the backend still had more to say)
        finally:
            Thoughtful.go.set()
        rid = events[0]["response"]["id"]
        assert events[-1]["type"] == "response.failed", [e["type"] for e in events[-3:]]
        error = events[-1]["response"]["error"]  # (errors.response_error: the SDK's code, the gateway's in type)
        assert (error["code"], error["type"]) == ("server_error", "response_too_large"), error
        for _ in range(2):  # (and it stays so: no renewal writes it in_progress again)
            got = client.responses.retrieve(rid)
            assert (got.status, got.error.code, got.error.type, got.output) == ("failed", "server_error", "response_too_large", [])
            time.sleep(2.5)
        resumed = requests.get(f"{gw.base_url}/responses/{rid}?stream=true&starting_after=0", timeout=30)
        if resumed.status_code == 200:
            last = parse_sse(resumed.content)[-1]
            assert last["type"] == "response.failed" and last["response"]["error"]["type"] == "response_too_large"
        else:
            assert not_kept(resumed), resumed.text  # (its events were not kept with it: a GET says why)
        assert client.responses.retrieve(rid).status == "failed"


class Wordy(QuietHandler):
    """A chat backend that answers at once with as many characters as the turn's text asks for
    ("say 300000"), in 16 KiB deltas, then ends (cut at its max_tokens when the text says "cut")."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        said = json.dumps(body["messages"][-1])
        size = int(re.search(r"say (\d+)", said).group(1))
        start_sse(self)
        self.wfile.write(http_chunk(chat_event({"role": "assistant", "content": ""})))
        for at in range(0, size, 16 << 10):
            self.wfile.write(http_chunk(chat_event({"content": "w" * min(16 << 10, size - at)})))
        self.wfile.write(http_chunk(chat_event(finish="length" if "cut" in said else "stop") + b"data: [DONE]\n\n"))
        self.wfile.write(http_chunk(b""))


def test_a_stored_turn_that_ends_past_the_store_tells_its_client_what_the_store_keeps(gateway_factory):
    """A turn whose output goes past what the store keeps (``max_session_memory_mb`` 1) only at
    its end, before any renewal saw it grow. A background one streamed: the store is where it is
    read from, so its client hears of its end only once it is stored, and hears what is stored:
    ``response.failed`` (``response_too_large``), as a GET says (before, its stream said
    ``response.completed`` while the store kept it ``failed``). One whose Response fits but whose
    events do not (a 300 KiB answer: ~1.5 MiB of events) is stored ``completed`` without its
    events, a resume told they were not kept (before: ``failed``, ``response_too_large``, after
    a stream that said ``completed``). A turn that is not background keeps its answer
    (``completed``: its client has it whole) and is not stored: a GET is the 404 of a response the
    store does not hold, a continuation ``previous_response_not_found``, a warning says why."""
    with LocalServer(Wordy) as backend:
        gw = gateway_factory(backend.url, "--set", "resp2chat_max_session_memory_mb=1",
                             "--set", "resp2chat_max_replay_entries=0")
        client = openai_client(gw)
        for said in ("say 1200000", "say 1200000, cut"):  # (completed, and incomplete: its max_output_tokens)
            big = requests.post(f"{gw.base_url}/responses", timeout=60, json={
                "model": "m", "input": said, "background": True, "stream": True})
            events = parse_sse(big.content)
            rid = events[0]["response"]["id"]
            assert events[-1]["type"] == "response.failed", [e["type"] for e in events[-3:]]
            error = events[-1]["response"]["error"]
            assert (error["code"], error["type"]) == ("server_error", "response_too_large"), error
            got = client.responses.retrieve(rid)
            assert (got.status, got.error.code, got.error.type, got.output) == ("failed", "server_error",
                                                                                 "response_too_large", [])
            assert got.error.message == error["message"] and got.incomplete_details is None
            assert got.completed_at is None and events[-1]["response"]["completed_at"] is None
            assert [e["sequence_number"] for e in events] == list(range(len(events)))  # (one terminal event)

        fits = requests.post(f"{gw.base_url}/responses", timeout=60, json={
            "model": "m", "input": "say 300000", "background": True, "stream": True})
        events = parse_sse(fits.content)
        rid = events[0]["response"]["id"]
        assert events[-1]["type"] == "response.completed", [e["type"] for e in events[-3:]]
        got = client.responses.retrieve(rid)
        assert got.status == "completed" and got.output_text == "w" * 300000, (got.status, got.error)
        assert not_kept(requests.get(f"{gw.base_url}/responses/{rid}?stream=true&starting_after=0", timeout=30))

        plain = requests.post(f"{gw.base_url}/responses", timeout=60, json={
            "model": "m", "input": "say 1200000", "stream": True, "store": True})
        events = parse_sse(plain.content)
        assert events[-1]["type"] == "response.completed", [e["type"] for e in events[-3:]]
        rid = events[-1]["response"]["id"]
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(rid)
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model="m", input="say 10", previous_response_id=rid)
        assert err.value.code == "previous_response_not_found"
        assert f"response {rid} not stored: the response store refused it (larger than it keeps" in gw.log(), gw.log()[-2000:]


def not_kept(answer: requests.Response) -> bool:
    """A resume refused because the events it asks for were not kept (the one error for it)."""
    return answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_value" and \
        "were not kept" in answer.json()["error"]["message"]


def test_large_streamed_runs_leave_no_events_behind_once_they_end(gateway_factory):
    """Background responses created with ``stream: true`` whose events pass ``MAX_EVENTS`` (4
    MiB; a 3 MiB answer makes ~15 MiB: the text in the deltas and again in each ``.done`` and in
    ``response.completed``) are not kept once they end, here as in the store: a resume is the
    clear 400 (GET it without stream), while a small one resumes whole. The gateway kept the
    last 64 runs' events whatever their size: 16 such runs, ended and deleted, left it holding
    ~250 MiB more (at 64: ~1 GB, a team's gateway). Now what the runs leave to the next full
    garbage collection (see the test above; ~60 MiB here). The ended logs it keeps are bounded in bytes too
    (``KEPT_BYTES``)."""
    with LocalServer(Sized) as backend:
        gw = gateway_factory(backend.url, "--set", "resp2chat_max_replay_entries=0",
                             env={"MALLOC_MMAP_THRESHOLD_": "131072"})
        client = openai_client(gw)

        def run(kib: int) -> str:
            r = requests.post(f"{gw.base_url}/responses", stream=True, timeout=60, json={
                "model": "m", "input": f"kib: {kib}", "background": True, "stream": True})
            rid = next(iter_sse(r))["response"]["id"]
            r.close()  # (the client goes away: it runs on)
            done = poll(client, rid, 120)
            assert done.status == "completed" and len(done.output_text) == kib * 1024 + 4
            return rid

        for _ in range(2):  # (what the first runs allocate once)
            client.responses.delete(run(3 * 1024))
        time.sleep(1)
        base = memory(gw.proc.pid)["VmRSS"]
        for _ in range(15):
            client.responses.delete(run(3 * 1024))
        large = run(3 * 1024)
        time.sleep(1)
        grown = memory(gw.proc.pid)["VmRSS"] - base
        print("GROWN0", grown / MiB)
        assert grown < 160 * MiB, f"16 large streamed background runs left the gateway holding {grown / MiB:.0f} MiB more"
        resumed = requests.get(f"{gw.base_url}/responses/{large}?stream=true", timeout=60)
        assert not_kept(resumed), (resumed.status_code, resumed.content[:300])
        small = run(64)
        raw = requests.get(f"{gw.base_url}/responses/{small}?stream=true", timeout=60).content
        assert check_stream(raw, small)[-1]["type"] == "response.completed"


def test_a_resume_on_another_replica_of_a_large_run_is_the_same_400(gateway_factory, redis_server):
    """A streamed background run on replica A whose events pass ``MAX_EVENTS`` keeps none once it
    ended: a resume is the 400 "not kept" on A and on B alike. A resume B took while the run went
    on (B follows it in Redis, and has answered its 200 then) ends with that error, as an
    ``error`` event numbered after ``starting_after``. Before, B's stream was empty: ``data:
    [DONE]`` alone, which no client can tell from a response that had no more events."""
    Sized.sent.clear()
    Sized.go.clear()
    with LocalServer(Sized) as backend:
        a, b = [gateway_factory(backend.url, "--set", "resp2chat_max_replay_entries=0",
                                "--set", f"resp2chat_state_store_url={redis_server.url}") for _ in range(2)]
        r = requests.post(f"{a.base_url}/responses", stream=True, timeout=60, json={
            "model": "m", "input": "pause, kib: 3072", "background": True, "stream": True})
        rid = next(iter_sse(r))["response"]["id"]
        r.close()  # (the run goes on)
        assert Sized.sent.wait(60)
        following = requests.get(f"{b.base_url}/responses/{rid}?stream=true&starting_after=0", stream=True,
                                 timeout=60)
        assert following.status_code == 200, following.text
        Sized.go.set()  # (the run ends: more than MAX_EVENTS of events, none kept)
        assert poll(openai_client(a), rid, 120).status == "completed"
        for gw in (a, b):
            resumed = requests.get(f"{gw.base_url}/responses/{rid}?stream=true&starting_after=0", timeout=60)
            assert not_kept(resumed), (gw.base_url, resumed.status_code, resumed.content[:300])
        raw = following.content
        assert raw.endswith(b"data: [DONE]\n\n"), raw[-300:]
        [error] = parse_sse(raw)
        assert error["type"] == "error" and error["sequence_number"] == 1, error
        assert error["status"] == 400 and error["code"] == "invalid_value" and "were not kept" in error["message"]
        assert error["error"]["code"] == "invalid_value"


def test_a_resume_on_another_replica_ends_with_an_error_when_the_run_is_deleted_or_dies(upstream, gateway_factory,
                                                                                         redis_server):
    """A resume replica B took of a run of replica A (B follows it in Redis, its 200 gone out)
    whose response is deleted meanwhile ends with the 404 a GET of it answers then
    (``response_not_found``), as an ``error`` event; one whose replica dies (its lease passes)
    ends with what a GET of it says then: ``server_error``, the gateway running it stopped.
    Before, both streams were ``data: [DONE]`` alone, which no client can tell from a response
    that had no more events. A resume of the dead one asked afterwards is refused so too (it was
    a 400 saying it had not been created with stream: true, once a GET had stored it failed)."""
    a, b = [gateway_factory(upstream.origin, "--set", f"resp2chat_state_store_url={redis_server.url}")
            for _ in range(2)]

    def follow() -> tuple[str, requests.Response]:
        r = requests.post(f"{a.base_url}/responses", stream=True, timeout=30, json={
            "model": "demo-model", "input": "noreason\nwords: 400\nslow: 100", "background": True, "stream": True})
        rid = next(iter_sse(r))["response"]["id"]
        r.close()  # (the run goes on)
        following = requests.get(f"{b.base_url}/responses/{rid}?stream=true&starting_after=3", stream=True,
                                 timeout=LEASE_SECS + 30)
        assert following.status_code == 200, following.text
        return rid, following

    def error(raw: bytes) -> dict:
        assert raw.endswith(b"data: [DONE]\n\n"), raw[-300:]
        [event] = parse_sse(raw)
        assert event["type"] == "error" and event["sequence_number"] == 4, event
        assert event["error"]["code"] == event["code"] and event["error"]["message"] == event["message"]
        return event

    rid, following = follow()
    assert requests.delete(f"{b.base_url}/responses/{rid}", timeout=30).json()["deleted"] is True
    gone = error(following.content)
    assert gone["status"] == 404 and gone["code"] == "response_not_found" and rid in gone["message"], gone
    assert requests.get(f"{b.base_url}/responses/{rid}", timeout=30).status_code == 404

    rid, following = follow()
    time.sleep(1)
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    died = error(following.content)
    failed = openai_client(b).responses.retrieve(rid)
    assert failed.status == "failed" and (died["code"], died["message"]) == (failed.error.code, failed.error.message)
    assert died["code"] == "server_error" and died["status"] == 500, died
    # a resume asked now (its failure stored by that GET, or about to be) is refused with the same
    for _ in range(2):
        resumed = requests.get(f"{b.base_url}/responses/{rid}?stream=true&starting_after=3", timeout=30)
        assert resumed.status_code == 500 and resumed.json()["error"]["message"] == died["message"], resumed.text


def test_a_running_log_keeps_its_latest_events_and_its_clients_get_them_all(gateway_factory):
    """While a streamed background response runs, the gateway holds its latest events only
    (about ``MAX_EVENTS``, 4 MiB), not all of them: a client streaming it gets every event to the
    end (the front goes only once every such client has it), a resume from a recent sequence
    number streams the rest, and one from events that went is the clear 400 (the one "not kept"
    error). The whole log was held while it ran (up to ~160 MiB for the largest answer a backend
    may give: 32 MiB of text)."""
    Sized.sent.clear()
    Sized.go.clear()
    with LocalServer(Sized) as backend:
        gw = gateway_factory(backend.url, "--set", "resp2chat_max_replay_entries=0")
        live = requests.post(f"{gw.base_url}/responses", stream=True, timeout=60, json={
            "model": "m", "input": "pause, kib: 6144", "background": True, "stream": True})
        raw, events, text = bytearray(), [], 0
        reading = iter_sse(live, into=raw)
        for event in reading:  # (6 MiB of text in deltas: past MAX_EVENTS while it runs)
            events.append(event)
            text += len(event.get("delta", ""))
            if text == 6 * MiB:
                break
        assert Sized.sent.is_set() and len(raw) > MAX_EVENTS
        rid, last = events[0]["response"]["id"], events[-1]["sequence_number"]
        url = f"{gw.base_url}/responses/{rid}?stream=true"
        from_start = requests.get(url, timeout=60, stream=True)
        refused = not_kept(from_start)
        from_start.close()
        recent = requests.get(f"{url}&starting_after={last - 2}", timeout=60, stream=True)
        assert recent.status_code == 200
        Sized.go.set()  # (the backend ends its answer)
        events += list(reading)
        rest = parse_sse(recent.content)
        assert refused, "a resume from the start of a run whose first events went was not refused"
        assert [e["type"] for e in check_stream(bytes(raw), rid)] == [e["type"] for e in events]
        assert "".join(e.get("delta", "") for e in events) == "x" * 6 * MiB + "end."
        assert rest[0]["sequence_number"] == last - 1 and rest == events[last - 1:]
        assert recent.content.endswith(b"data: [DONE]\n\n") and rest[-1]["type"] == "response.completed"
        # once it ended: its events (more than MAX_EVENTS) were not kept, here as in the store
        assert not_kept(requests.get(url, timeout=60))


class Held(QuietHandler):
    """A chat backend answering ``start.``, then the ``kib: N`` the request asks for (N KiB of
    text in 64 KiB chunks), ``STEP`` at a time, each once ``more`` lets it (a test's client took
    the one before: its reader is never far behind, however slow the machine), then, once ``go``
    is set, ``end.``."""

    STEP = 2 * MiB
    more = threading.Semaphore(0)
    go = threading.Event()

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        start_sse(self)
        self.wfile.write(http_chunk(chat_event({"content": "start."})))
        self.wfile.flush()
        for _ in range(int(re.search(rb"kib: (\d+)", body)[1]) * KiB // self.STEP):
            assert type(self).more.acquire(timeout=120)
            for _ in range(self.STEP // (64 * KiB)):
                self.wfile.write(http_chunk(chat_event({"content": "x" * (64 * KiB)})))
            self.wfile.flush()
        type(self).go.wait(120)
        self.wfile.write(http_chunk(chat_event({"content": "end."}) + chat_event(finish="stop") + b"data: [DONE]\n\n"))
        self.wfile.write(http_chunk(b""))


class Stalled:
    """A client that asks for a stream, reads its first event, then stops reading (its socket's
    receive buffer small, set before it connects: the window it offers stays small)."""

    def __init__(self, gw, head: str, body: dict | None = None) -> None:
        payload = json.dumps(body).encode() if body is not None else b""
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(30)
        self.sock.connect(("127.0.0.1", gw.port))
        self.sock.sendall(f"{head} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                          f"content-length: {len(payload)}\r\n\r\n".encode() + payload)
        self.raw = bytearray()
        while b"\n\n" not in self.raw.partition(b"\r\n\r\n")[2]:
            piece = self.sock.recv(4096)
            assert piece, f"the gateway closed the stream: {self.raw[:500]!r}"
            self.raw += piece
        assert self.raw.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in self.raw.lower(), \
            self.raw[:500]

    def rest(self, idle: float = 10) -> tuple[bytes, bool]:
        """It reads again, to its stream's end (or until nothing came for ``idle`` seconds): its
        body (dechunked), and whether the stream ended."""
        self.sock.settimeout(idle)
        while not (ended := self.raw.endswith(b"\r\n0\r\n\r\n")):
            try:
                piece = self.sock.recv(1 << 20)
            except TimeoutError:
                break
            if not piece:
                break
            self.raw += piece
        self.sock.close()
        body, pos, chunked = bytearray(), self.raw.index(b"\r\n\r\n") + 4, self.raw
        while (end := chunked.find(b"\r\n", pos)) > 0 and (size := int(chunked[pos:end], 16)):
            body += chunked[end + 2:end + 2 + size]
            pos = end + 2 + size + 2
        return bytes(body), ended


def test_a_client_that_stops_reading_a_running_log_is_cut_and_the_run_goes_on(gateway_factory):
    """A client streaming a background response that stops reading (its socket full, not closed)
    is not waited for: once it is ``LAG`` (8 MiB) behind the response's events and took nothing
    for ``LAG_SECS`` since, its stream ends
    with an ``error`` event (``stream_lagged``, numbered after the last event it got: it finds it
    once it reads again), while the run goes on and a client streaming it live gets every event
    to the end; the gateway does not hold what the stalled clients did not take (their sockets
    and its buffers for them stay small: ~3 MiB each here). Both such clients: the one that
    created it (``POST`` with ``stream``) and one that resumed it (``GET`` with ``starting_after``).
    With no such cut, they held the run's events from where they stopped for as long as it ran."""
    text = 24 * MiB  # (its deltas alone: far past LAG and what the sockets between hold)
    Held.more = threading.Semaphore(0)
    Held.go.clear()
    with LocalServer(Held) as backend:
        # (blocks of 128 KiB and more are mapped and unmapped: RSS follows what is freed; a
        # stalled client is not closed meanwhile for taking none of its answer: its cut is the lag's)
        gw = gateway_factory(backend.url, "--set", "resp2chat_max_replay_entries=0",
                             "--set", "resp2chat_header_timeout_secs=600", env={"MALLOC_MMAP_THRESHOLD_": "131072"})
        base = memory(gw.proc.pid)["VmRSS"]
        created = Stalled(gw, "POST /v1/responses", {
            "model": "m", "input": f"kib: {text // KiB}", "background": True, "stream": True})
        rid = re.search(rb'"id": ?"(resp_[^"]+)"', created.raw)[1].decode()  # (its first event: response.created)
        live = requests.get(f"{gw.base_url}/responses/{rid}?stream=true", stream=True, timeout=60)  # (from its start)
        raw, events, got = bytearray(), [], 0
        reading = iter_sse(live, into=raw)
        for event in reading:
            events.append(event)
            if event.get("delta") == "start.":
                break
        resumed = Stalled(gw, f"GET /v1/responses/{rid}?stream=true&starting_after=1")
        Held.more.release()  # (the backend sends its text: the stalled clients take none of it)
        for event in reading:
            events.append(event)
            got += len(event.get("delta", ""))
            if got == text:
                break
            if got % Held.STEP == 0:
                Held.more.release()
        grown = memory(gw.proc.pid)["VmRSS"] - base  # (the run waits for go, in progress)
        time.sleep(LAG_SECS + 1)  # (LAG behind, and nothing taken for LAG_SECS: cut)
        for stalled, first in ((created, 0), (resumed, 2)):  # (they read again: the rest of their stream)
            body, ended = stalled.rest()
            assert ended and body.endswith(b"data: [DONE]\n\n"), \
                f"a stalled client's stream did not end: {body[-300:]!r}"
            lagged = parse_sse(body)
            assert [e["type"] == "error" for e in lagged] == [False] * (len(lagged) - 1) + [True]
            assert lagged[-1]["code"] == "stream_lagged" and lagged[-1]["error"]["code"] == "stream_lagged", lagged[-1]
            assert [e["sequence_number"] for e in lagged] == list(range(first, first + len(lagged)))
            assert lagged[:-1] == events[first:first + len(lagged) - 1] and len(body) < text - LAG // 2
        client = openai_client(gw)
        assert client.responses.retrieve(rid).status == "in_progress"  # (the run went on meanwhile)
        Held.go.set()  # (the backend ends its answer)
        events += list(reading)
        done = poll(client, rid)
    assert [e["type"] for e in check_stream(bytes(raw), rid)] == [e["type"] for e in events]
    assert "".join(e.get("delta", "") for e in events) == done.output_text == "start." + "x" * text + "end."
    assert raw.endswith(b"data: [DONE]\n\n") and events[-1]["type"] == "response.completed"
    # (a generous bound: what the run itself holds meanwhile grows with its text, more than once;
    # here ~68 MiB in all, ~86 with no cut; each stalled client's events held in the gateway's
    # buffers would add ~24 MiB)
    assert grown < 4 * text, f"the gateway held {grown / MiB:.0f} MiB more while its stalled clients waited"


def test_a_resume_of_a_streamed_run_cancelled_after_its_replica_died_says_why(upstream, gateway_factory, redis_server):
    """Replica A runs a streamed background response and dies; past its lease a cancellation on
    replica B ends it ``cancelled`` there. A resume of it then was refused as if it had been
    created without ``stream: true`` (B stored it without saying it was streamed); it is refused
    saying its events went with the gateway that ran it. A GET and a second cancellation still
    answer ``cancelled``."""
    a, b = [gateway_factory(upstream.origin, "--set", f"resp2chat_state_store_url={redis_server.url}")
            for _ in range(2)]
    r = requests.post(f"{a.base_url}/responses", stream=True, timeout=30, json={
        "model": "demo-model", "input": "noreason\nwords: 400\nslow: 100", "background": True, "stream": True})
    rid = next(iter_sse(r))["response"]["id"]
    r.close()  # (the run goes on)
    time.sleep(1)
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    time.sleep(LEASE_SECS + 1)
    on_b = openai_client(b)
    assert on_b.responses.cancel(rid).status == "cancelled"
    resumed = requests.get(f"{b.base_url}/responses/{rid}?stream=true", timeout=30)
    assert resumed.status_code == 400, resumed.text
    error = resumed.json()["error"]
    assert error["param"] == "stream" and "went with that gateway" in error["message"], error
    assert "created with stream: true" not in error["message"]
    assert on_b.responses.retrieve(rid).status == on_b.responses.cancel(rid).status == "cancelled"
    assert "orphaned" not in requests.get(f"{b.base_url}/responses/{rid}", timeout=30).text


def test_slow_readers_of_a_kept_log_hold_a_piece_each_not_the_log(upstream, gateway_factory, tmp_path):
    """Resumes of an ended run's kept events (~3 MB) by clients that read next to nothing: each
    tick handed the client all it had not taken, so every such connection held a copy of the log
    in its write buffer (the red team: ~5.5 MB a connection, 500 of them 2.9 GB, for a GET each).
    Now a feed hands out ``PIECE`` bytes a tick, the next once the client took the last: what a
    slow reader holds is a piece; a client that reads gets every event, in order, to ``[DONE]``."""
    from resp2chat_io.addons.background import PIECE

    flows_path = tmp_path / "flows.mitm"
    gw = gateway_factory(upstream.origin, "--set", "flow_detail=0", "-w", str(flows_path))
    first = requests.post(f"{gw.base_url}/responses", timeout=120, json={
        "model": "demo-model", "input": "noreason\nwords: 12000", "background": True, "stream": True})
    events = parse_sse(first.content)
    assert events[-1]["type"] == "response.completed" and len(first.content) > 2 * MiB, len(first.content)
    rid = events[0]["response"]["id"]
    head = (f"GET /v1/responses/{rid}?stream=true&starting_after=0 HTTP/1.1\r\n"
            f"host: 127.0.0.1:{gw.port}\r\n\r\n").encode()
    base = memory(gw.proc.pid)["VmRSS"]
    slow = []
    try:
        for _ in range(40):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", gw.port))
            s.sendall(head)
            slow.append(s)
        for s in slow:
            s.settimeout(10)
            assert s.recv(16).startswith(b"HTTP/1.1 200")  # (answered: a reader that takes next to nothing)
        time.sleep(2)
        grown = memory(gw.proc.pid)["VmRSS"] - base
        # (before: each held the log, 40 x ~3 MB; now a piece and the socket's buffer each)
        assert grown < 40 * (PIECE + 512 * KiB), f"{grown >> 20} MiB for 40 slow readers"
        # a reader that reads gets it all, in order, while they wait
        resumed = requests.get(f"{gw.base_url}/responses/{rid}?stream=true&starting_after=0", timeout=60)
        again = parse_sse(resumed.content)
        assert resumed.content.endswith(b"data: [DONE]\n\n")
        assert [e["sequence_number"] for e in again] == [e["sequence_number"] for e in events[1:]]
        assert [e["sequence_number"] for e in again] == list(range(1, len(again) + 1))
    finally:
        for s in slow:
            s.close()
    gw.stop()
    # the flow of the turn that created it keeps the stream its client got; a resume's flow keeps
    # none of it (the log is kept once, for every client: mitm_head.py ``_unkept``)
    flows = read_flows(flows_path)
    created = [f for f in flows if f.request.method == "POST"]
    resumes = [f for f in flows if f.request.method == "GET" and "/responses/" in f.request.path and f.response is not None]
    assert len(created) == 1 and created[0].response.content == first.content
    kept = [f.response.content for f in resumes]  # (None: one its client closed mid-stream)
    assert b"" in kept and set(kept) <= {b"", None}, [len(c) if c else c for c in kept]
