"""Stateless reasoning: ``include: ["reasoning.encrypted_content"]`` hands clients their reasoning
sealed (resp2chat_core/seal.py), and the gateway restores it for the backend when it comes back."""

from __future__ import annotations

import uuid

import pytest
import requests

from helpers import Codex, chat_chunk, chat_sse, responses_requests
from resp2chat_core.inputs import REASONING_PURPOSE
from resp2chat_core.seal import Sealer, derive_key
from resp2chat_core.translator import Translator, TurnContext

INCLUDE = ["reasoning.encrypted_content"]


@pytest.mark.parametrize("asked", [True, False])
def test_translator_seals_the_reasoning_text_only_when_asked(asked):
    sealer = Sealer(lambda: derive_key("k"))
    t = Translator(TurnContext("resp_x", 1, "m", sealer=sealer, encrypted_reasoning=asked))
    t.feed(chat_sse(chat_chunk({"reasoning_content": "I think "}), chat_chunk({"reasoning_content": "twice."}),
                    chat_chunk({"content": "Hi"}), chat_chunk(finish="stop")))
    t.finish()
    reasoning = t.output[0]
    assert reasoning["summary"][0]["text"] == "I think twice."
    if asked:
        assert sealer.unseal(REASONING_PURPOSE, reasoning["encrypted_content"]) == "I think twice."
    else:
        assert "encrypted_content" not in reasoning


def test_a_stateless_client_gets_its_reasoning_back_to_the_backend(client, upstream):
    first = client.responses.create(model="demo-model", input="stateless question", store=False, include=INCLUDE)
    reasoning = first.output[0]
    assert reasoning.type == "reasoning" and reasoning.encrypted_content.startswith("r2c1.")
    assert "stateless" not in reasoning.encrypted_content  # opaque
    # The client keeps the items (not the summary: clients may drop or shorten it) and goes on.
    back = reasoning.model_dump(exclude_none=True) | {"summary": []}
    upstream.clear()
    second = client.responses.create(model="demo-model", store=False, include=INCLUDE, input=[
        {"role": "user", "content": "stateless question"}, back, first.output[1].model_dump(exclude_none=True),
        {"role": "user", "content": "and then?"}])
    assert second.status == "completed"
    assistant = upstream.requests()[-1]["messages"][1]
    assert assistant["reasoning_content"] == "Thinking about: stateless question"
    assert assistant["content"] == "You said: stateless question"


def test_without_include_nothing_is_sealed(client):
    resp = client.responses.create(model="demo-model", input="plain", store=False)
    assert resp.output[0].type == "reasoning" and resp.output[0].encrypted_content is None


@pytest.mark.parametrize("bad", ["gAAAAABforeign-provider-blob", "r2c1.AAAA", "tampered"])
def test_encrypted_content_that_fails_its_check_is_400(client, gateway, bad):
    first = client.responses.create(model="demo-model", input="q", store=False, include=INCLUDE)
    token = first.output[0].encrypted_content
    if bad == "tampered":
        bad = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    item = first.output[0].model_dump(exclude_none=True) | {"encrypted_content": bad}
    r = requests.post(gateway.base_url + "/responses", timeout=30, json={
        "model": "demo-model", "input": [{"role": "user", "content": "q"}, item, {"role": "user", "content": "x"}]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("invalid_encrypted_content", "input[1].encrypted_content")


@pytest.mark.codex
def test_codex_round_trips_sealed_reasoning(codex_bin, upstream, gateway_factory, tmp_path):
    """Codex always sends include + store: false: its second request carries our sealed reasoning."""
    flows = tmp_path / "flows.mitm"
    gw = gateway_factory(upstream.origin, "-w", str(flows), "--set", "resp2chat_max_replay_entries=0")
    cx = Codex.at(codex_bin, tmp_path)
    cx.configure(gw.base_url)
    marker = uuid.uuid4().hex
    upstream.clear()
    run = cx.exec(f"please run this\nrun: echo {marker}")
    assert run.returncode == 0, run.output
    gw.stop()  # flushes the flow file
    sent = responses_requests(flows)
    assert len(sent) == 2 and all(s["include"] == INCLUDE and s["store"] is False for s in sent)
    reasoning = [i for i in sent[1]["input"] if i.get("type") == "reasoning"]
    assert reasoning and all(i["encrypted_content"].startswith("r2c1.") for i in reasoning), reasoning
    second = upstream.requests()[-1]["messages"]
    assert any(m.get("reasoning_content") == f"Thinking about: run: echo {marker}" for m in second), second
