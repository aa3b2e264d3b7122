"""A client's limits bound everything it makes a backend do, not only its turns: a passthrough
that is not a read (``POST /v1/embeddings``) and ``POST /v1/responses/input_tokens`` (the
backend's tokenizer) are asked about by the same admission as a turn (addons/limits.py), against
a real gateway, the scripted backend's real ``/v1/embeddings``, the real openai SDK. Before,
they were never counted: a client held to 2 requests a minute could embed without end, while
its one stream was open, and spend no tokens. Across replicas (Redis): test_teams.py."""

from __future__ import annotations

import threading

import openai
import pytest
import requests

from helpers import cli_env, open_embedding, openai_client, post_turn, rest, run_cli, scrape, start_gateway, wait_until

ALL = "demo-model"


@pytest.fixture
def limited(tmp_path, upstream):
    """A gateway with one client, ``carol``, made by ``resp2chat keys add carol FLAGS``: (gw, key)."""
    made = []

    def make(*flags: str):
        out = run_cli(tmp_path, "keys", "add", "carol", *flags)
        assert out.returncode == 0, out.stderr
        gw = start_gateway(upstream.origin, tmp_path, env=cli_env(tmp_path))
        made.append(gw)
        return gw, out.stdout.strip()

    yield make
    for gw in made:
        gw.stop()


def embed(gw, key: str, text: str = "hello", **kw) -> requests.Response:
    return requests.post(gw.base_url + "/embeddings", json={"model": ALL, "input": text}, timeout=30,
                         headers={"authorization": f"Bearer {key}"}, **kw)


def count(gw, key: str) -> requests.Response:
    return requests.post(gw.base_url + "/responses/input_tokens", json={"model": ALL, "input": "how many?"},
                         timeout=30, headers={"authorization": f"Bearer {key}"})


def test_rpm_counts_embeddings_and_input_tokens_as_turns(limited):
    gw, key = limited("--rpm", "3")
    sdk = openai_client(gw, api_key=key)
    first = sdk.embeddings.with_raw_response.create(model=ALL, input="hello")
    assert first.headers["x-ratelimit-limit-requests"] == "3"
    assert first.headers["x-ratelimit-remaining-requests"] == "2"
    assert len(first.parse().data[0].embedding) == 8
    assert sdk.models.list().data  # a read: not counted
    counted = count(gw, key)
    assert counted.status_code == 200 and counted.json()["input_tokens"] > 0
    assert counted.headers["x-ratelimit-remaining-requests"] == "1"
    sdk.embeddings.create(model=ALL, input="again")
    # the fourth request of the minute, whatever it is, is refused as a turn is: 429 with OpenAI's headers
    with pytest.raises(openai.RateLimitError) as err:
        sdk.embeddings.create(model=ALL, input="one too many")
    assert err.value.code == "rate_limit_exceeded" and "rpm" in err.value.message
    headers = err.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 20 and int(headers["retry-after-ms"]) > 0
    assert headers["x-ratelimit-remaining-requests"] == "0" and "x-request-id" in headers
    for refused in (count(gw, key), post_turn(gw, {"model": ALL, "input": "hi"}, {"authorization": f"Bearer {key}"})):
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded", refused.text
    assert sdk.models.list().data  # reads still are not


def test_max_streams_holds_embeddings_while_a_turn_streams_and_the_other_way(limited, upstream):
    gw, key = limited("--max-streams", "1")
    auth = {"authorization": f"Bearer {key}"}
    slow: dict = {}

    def long_turn():
        slow["r"] = post_turn(gw, {"model": ALL, "input": "words: 30 slow: 100", "stream": True}, auth)

    t = threading.Thread(target=long_turn)
    t.start()
    wait_until(lambda: scrape(gw, **auth)[("resp2chat_streams_in_flight", ())] == 1, 20, "carol's turn open")
    busy = embed(gw, key)
    assert busy.status_code == 429 and "max_streams" in busy.json()["error"]["message"], busy.text
    assert int(busy.headers["retry-after"]) >= 1 and "x-request-id" in busy.headers
    assert count(gw, key).status_code == 429
    t.join(30)
    assert slow["r"].status_code == 200
    assert embed(gw, key).status_code == 200  # the turn over: admitted again
    # an embeddings answer still coming keeps a turn out until its end ...
    with open_embedding(gw, key, ["slow: 300", "b", "c", "d", "e"]) as sock:
        refused = post_turn(gw, {"model": ALL, "input": "now?"}, auth)
        assert refused.status_code == 429 and "max_streams" in refused.text
        assert b'"index":4' in rest(sock).replace(b" ", b"") and b'"usage"' in sock.got
    assert post_turn(gw, {"model": ALL, "input": "now?"}, auth).status_code == 200
    # ... or until its client goes away mid-answer
    with open_embedding(gw, key, ["slow: 2000", "b", "c"]):
        assert post_turn(gw, {"model": ALL, "input": "now?"}, auth).status_code == 429
    wait_until(lambda: post_turn(gw, {"model": ALL, "input": "now?"}, auth).status_code == 200, 10,
               "the left embedding released")


def test_tpm_spends_the_embeddings_usage_and_a_cut_answer_its_size(limited):
    gw, key = limited("--tpm", "2000")
    sdk = openai_client(gw, api_key=key)

    def remaining() -> int:
        r = count(gw, key)  # (input_tokens spends none: a tokenizer's answer has no usage)
        assert r.status_code == 200, r.text
        return int(r.headers["x-ratelimit-remaining-tokens"])

    before = remaining()
    text = "x" * 2000  # 500 tokens by the backend's count
    answer = sdk.embeddings.create(model=ALL, input=text)
    assert answer.usage.total_tokens == 500
    after = remaining()
    assert 450 <= before - after <= 500, (before, after)  # (~33 come back a second)
    # an answer its client leaves before the usage (its end) is charged by its request's size
    with open_embedding(gw, key, [text, "slow: 2000", "b"]):
        pass  # (gone after the answer's head)
    wait_until(lambda: remaining() < after - 400, 10, "the cut answer charged")
    # below zero: the next request of any kind waits
    sdk.embeddings.create(model=ALL, input=text * 4)
    with pytest.raises(openai.RateLimitError) as err:
        sdk.embeddings.create(model=ALL, input="more")
    assert "tpm" in err.value.message and int(err.value.response.headers["retry-after"]) >= 1
    assert err.value.response.headers["x-ratelimit-remaining-tokens"] == "0"
