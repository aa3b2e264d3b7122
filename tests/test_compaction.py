"""Remote compaction in the core (resp2chat_core/compaction.py): the summary request, the one
sealed compaction item, and the item lowered in later requests. The real Codex CLI's side is in
test_codex_builtin.py; the /v1/responses/compact endpoint through a real mitmdump in
test_compact_endpoint.py."""

from __future__ import annotations

import json

import pytest

from resp2chat_core.compaction import COMPACTION_PROMPT, PURPOSE, SUMMARY_PREFIX
from resp2chat_core.errors import GatewayError
from resp2chat_core.lowering import LoweringOptions
from resp2chat_core.seal import Sealer, derive_key, seal
from resp2chat_core.turn import ToolsCache, begin_turn

from helpers import DONE, FIXTURES, chat_event, parse_sse

FIXTURE = FIXTURES / "codex-0.169.0-builtin-provider" / "06-builtin-provider-remote-compaction.json"
KEY = derive_key("test key")
SEALER = Sealer(lambda: KEY)
RESP_ID = "resp_00112233445566778899aabbccddeeff"


def compaction_request() -> dict:
    """What Codex 0.169.0 (built-in provider) sent when it compacted: the history, then the trigger."""
    return json.loads(FIXTURE.read_text())["body"]


def turn(body: dict, sealer=SEALER, cache=None):
    return begin_turn(json.dumps(body).encode(), LoweringOptions(), RESP_ID, 1795526192, tools_cache=cache, sealer=sealer)


USAGE = {"prompt_tokens": 9000, "completion_tokens": 40, "total_tokens": 9040, "prompt_tokens_details": {"cached_tokens": 8960}}


def summarize(t, *chunks: bytes) -> list[dict]:
    tr = t.translator()
    out = tr.accepted() + b"".join(tr.feed(c) for c in chunks) + tr.feed(DONE) + tr.finish()
    return parse_sse(out)


def test_summary_request_is_the_conversation_then_the_prompt_with_the_same_tools():
    body = compaction_request()
    assert body["input"][-1] == {"type": "compaction_trigger"}
    compact = json.loads(turn(body).chat_body)
    plain = json.loads(turn({**body, "input": body["input"][:-1]}).chat_body)
    # the backend sees the conversation it already has in its prefix cache, then one more message
    assert compact["messages"][:-1] == plain["messages"]
    assert compact["messages"][-1] == {"role": "user", "content": COMPACTION_PROMPT}
    assert compact["tools"] == plain["tools"] and compact["tool_choice"] == "none"
    raw_compact, raw_plain = turn(body).chat_body, turn({**body, "input": body["input"][:-1]}).chat_body
    cut = raw_plain.index(b'],"tools":')  # the end of the messages
    assert raw_compact[:cut] == raw_plain[:cut]  # byte for byte, the same conversation


def test_summary_request_is_the_same_through_the_tools_cache():
    cache = ToolsCache()
    first, second = turn(compaction_request(), cache=cache), turn(compaction_request(), cache=cache)
    assert cache.hits == 1 and first.chat_body == second.chat_body and first.compaction and second.compaction


def test_the_answer_is_exactly_one_sealed_compaction_item_and_completed_with_usage():
    t = turn(compaction_request())
    events = summarize(t, chat_event({"role": "assistant", "reasoning_content": "let me think"}),
                       chat_event({"content": "Goal: fix the "}), chat_event({"content": "login bug."}),
                       chat_event({"tool_calls": [{"index": 0, "id": "x",
                                                   "function": {"name": "exec_command", "arguments": "{}"}}]}),
                       chat_event(finish="stop"), chat_event(choices=[], usage=USAGE))
    types = [e["type"] for e in events]
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    item = events[3]["item"]
    assert item["type"] == "compaction" and item["id"].startswith("cmp_") and events[2]["item"] == item
    assert SEALER.unseal(PURPOSE, item["encrypted_content"]) == "Goal: fix the login bug."  # reasoning and calls dropped
    assert "the login bug" not in item["encrypted_content"]  # (base64 never spells a phrase with spaces)
    final = events[-1]["response"]
    assert final["output"] == [item] and final["status"] == "completed"
    assert final["usage"]["input_tokens"] == 9000 and final["usage"]["output_tokens"] == 40
    assert final["usage"]["input_tokens_details"]["cached_tokens"] == 8960


def test_a_summary_cut_at_the_length_limit_is_still_the_summary():
    events = summarize(turn(compaction_request()), chat_event({"content": "partial summary"}),
                       chat_event(finish="length"))
    assert events[-1]["type"] == "response.completed"
    assert SEALER.unseal(PURPOSE, events[-1]["response"]["output"][0]["encrypted_content"]) == "partial summary"


def test_no_summary_text_fails_so_codex_retries():
    events = summarize(turn(compaction_request()), chat_event({"reasoning_content": "hmm"}),
                       chat_event({"content": "  \n"}), chat_event(finish="stop"))
    assert events[-1]["type"] == "response.failed" and events[-1]["response"]["error"]["code"] == "server_error"
    assert not [e for e in events if e["type"] == "response.output_item.done"]


def later_request(token: str) -> dict:
    """What Codex sends after compacting: its user messages, the item, then the next turn."""
    body = compaction_request()
    developer = [i for i in body["input"] if i.get("role") == "developer"]
    users = [i for i in body["input"] if i.get("role") == "user"]
    item = {"type": "compaction", "encrypted_content": token}
    nxt = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "and now?"}]}
    return {**body, "input": developer + users + [item, nxt]}


def test_a_later_request_lowers_the_item_to_its_summary_in_place_deterministically():
    body = later_request(SEALER.seal(PURPOSE, "Goal: fix the login bug."))
    chat = json.loads(turn(body).chat_body)
    messages = chat["messages"]
    assert messages[-2] == {"role": "user", "content": SUMMARY_PREFIX + "Goal: fix the login bug."}
    assert messages[-1] == {"role": "user", "content": "and now?"}
    assert "tool_choice" not in chat or chat["tool_choice"] != "none"
    # the same summary sealed again (another nonce) lowers to the same bytes: the prefix cache holds
    again = later_request(SEALER.seal(PURPOSE, "Goal: fix the login bug."))
    assert again["input"][-2] != body["input"][-2]
    assert turn(again).chat_body == turn(body).chat_body
    # and a further turn extends it: the item stays where it was
    longer = {**body, "input": body["input"] + [{"type": "message", "role": "assistant",
                                                 "content": [{"type": "output_text", "text": "ok"}]}]}
    assert turn(longer).chat_body.startswith(turn(body).chat_body.split(b'"and now?"}')[0])


@pytest.mark.parametrize("token, why", [
    ("r2c1.AAAA", "malformed"),
    (seal(derive_key("another gateway"), PURPOSE, "Goal: mine"), "another key"),
    (seal(KEY, "reasoning", "Goal: mine"), "another purpose"),
    ("gAAAAABpZ-openai-encrypted-state", "another provider"),
])
def test_an_item_the_gateway_did_not_make_is_a_400_naming_it(token, why):
    body = later_request(token)
    index = len(body["input"]) - 2
    with pytest.raises(GatewayError) as err:
        turn(body)
    assert err.value.status == 400 and err.value.code == "invalid_encrypted_content", why
    assert err.value.param == f"input[{index}].encrypted_content"
    assert str(err.value).startswith(f"input[{index}].encrypted_content: ")  # (where param points: inputs.where)


def test_an_altered_item_is_refused():
    token = SEALER.seal(PURPOSE, "Goal: fix the login bug.")
    flipped = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    with pytest.raises(GatewayError, match=r"input\[\d+\]\.encrypted_content: this compaction item was not made by this gateway"):
        turn(later_request(flipped))


def test_item_without_content_and_misplaced_trigger_are_400s():
    body = later_request("x")
    del body["input"][-2]["encrypted_content"]
    with pytest.raises(GatewayError, match="needs its encrypted_content"):
        turn(body)
    body = compaction_request()
    body["input"] = [{"type": "compaction_trigger"}] + body["input"]
    with pytest.raises(GatewayError) as err:
        turn(body)
    assert err.value.param == "input[0].type"


def test_stored_items_keep_the_sealed_item_and_drop_the_trigger():
    from resp2chat_core.compaction import users

    body = {**compaction_request(), "store": True}
    t = turn(body)
    # (a compaction turn keeps what Codex keeps, its user messages: the output brings the item)
    assert t.store and t.items == users(body["input"][:-1]) and len(t.items) < len(body["input"]) - 1
    token = SEALER.seal(PURPOSE, "s")
    t2 = turn({**later_request(token), "store": True})
    assert {"type": "compaction", "encrypted_content": token} in t2.items


def test_through_the_gateway_a_forged_item_is_a_400_naming_it(gateway):
    import requests

    body = later_request("r2c1.not-made-by-this-gateway")
    r = requests.post(gateway.base_url + "/responses", json=body, timeout=30)
    index = len(body["input"]) - 2
    assert r.status_code == 400
    assert r.json()["error"]["param"] == f"input[{index}].encrypted_content"
    assert r.json()["error"]["code"] == "invalid_encrypted_content"
    assert r.json()["error"]["message"].startswith(f"input[{index}].encrypted_content: ")


def test_an_item_is_named_by_its_place_in_the_client_s_own_input_when_it_continues_a_response():
    """A compaction item (or a trigger) that cannot be used, in the input of a request that
    continues a stored response: the 400 names its place in the client's input, as every other
    item's error does (inputs.expand), not its place in the whole conversation (which the client
    never sent); one in the stored conversation names the previous response. Before, both were
    named input[<place in the whole conversation>]: an index past the client's input, or one that
    named another of its items."""
    from resp2chat_core.turn import Found

    earlier = [{"role": "user", "content": "hi"},
               {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hello"}]}]
    forged = {"type": "compaction", "encrypted_content": seal(derive_key("another gateway"), PURPOSE, "Goal: mine")}
    cases = [
        ([{"role": "user", "content": "more"}, forged, {"role": "user", "content": "and?"}], earlier,
         "input[1].encrypted_content", "input[1].encrypted_content: ", "invalid_encrypted_content"),
        ([forged, {"role": "user", "content": "and?"}], earlier, "input[0].encrypted_content", "input[0].encrypted_content: ",
         "invalid_encrypted_content"),
        ([{"type": "compaction"}], earlier, "input[0].encrypted_content", "input[0].encrypted_content: ", "invalid_value"),
        ([{"type": "compaction_trigger"}, {"role": "user", "content": "and?"}], earlier, "input[0].type", "input[0].type: ",
         "invalid_value"),
        ([{"role": "user", "content": "and?"}], [*earlier, forged], "previous_response_id",
         "item 2 of the conversation previous_response_id continues", "invalid_encrypted_content"),
    ]
    for new, stored, param, starts, code in cases:
        body = {"model": "m", "previous_response_id": "resp_stored", "input": new}
        with pytest.raises(GatewayError) as err:
            begin_turn(json.dumps(body).encode(), LoweringOptions(), RESP_ID, 1, Found(earlier=stored), sealer=SEALER)
        assert (err.value.param, err.value.code) == (param, code), (new, err.value.param, str(err.value))
        assert str(err.value).startswith(starts), str(err.value)


@pytest.mark.parametrize("pieces, summary", [
    (["<think>plan", "</think>Goal: tea."], "Goal: tea."),
    (["plan</think>", "Goal: tea."], "Goal: tea."),  # (a think block without its <think>: no part of it)
    (["pl", "an</th", "ink>Goal: tea."], "Goal: tea."),
    (["Goal: <think>x</think> tea"], "tea"),
    (["<think>only thinking"], None),  # (no summary at all)
    (["Goal: tea.", " <think>"], "Goal: tea. <think>"),
])
def test_server_side_compaction_reads_think_tags_as_the_compact_endpoint_does(pieces, summary):
    """The summary of server-side compaction (``SummaryReader``) and of the compact endpoint
    (``CompactionTranslator``) are the same text for the same stream: <think> tags read the
    upstream's way (think.py, the default ``auto`` here), text that turns out to be reasoning
    (its </think> came without a <think>) dropped. Before, the reader cut at the last </think> and
    left out <think>…</think> wherever it stood, and kept an unclosed <think>: a summary the
    endpoint had no summary for; the endpoint kept what came before a lone </think>."""
    from resp2chat_core.compaction import SummaryReader

    stream = b"".join(chat_event({"content": p}) for p in pieces) + chat_event(finish="stop") + DONE
    reader = SummaryReader()
    reader.feed(stream)
    reader.finish()
    events = summarize(turn(compaction_request()), stream)
    final = events[-1]["response"]
    endpoint = SEALER.unseal(PURPOSE, final["output"][0]["encrypted_content"]) if final["status"] == "completed" \
        else None
    assert (reader.text() or None, endpoint) == (summary, summary)
