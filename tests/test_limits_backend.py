"""A client's limits bound everything it makes a backend do, not only its turns: a passthrough
that is not a read (``POST /v1/embeddings``) and ``POST /v1/responses/input_tokens`` (the
backend's tokenizer) are asked about by the same admission as a turn (addons/limits.py), against
a real gateway, the scripted backend's real ``/v1/embeddings``, the real openai SDK. Before,
they were never counted: a client held to 2 requests a minute could embed without end, while
its one stream was open, and spend no tokens. Across replicas (Redis): test_teams.py."""

from __future__ import annotations

import contextlib
import json
import threading

import openai
import pytest
import requests

from helpers import (
    LocalServer, QuietHandler, chat_chunk, chat_sse, cli_env, open_embedding, openai_client, post_turn, rest, run_cli,
    scrape, send_json, send_sse, start_gateway, tool_call_chunk, wait_until,
)

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


def test_every_answer_a_limited_client_gets_says_its_limits(limited):
    """OpenAI's ``x-ratelimit-*`` on whatever a limited client asked that counted against its
    limits: a JSON and a streamed turn, a cached answer, a background response created as JSON
    and as a stream, a compaction, a token count, embeddings, a turn refused after it was
    admitted. Before, a background response created with ``stream: true`` had none (its events
    come from the run's log, answered by another hook than a turn's stream)."""
    gw, key = limited("--rpm", "100", "--tpm", "100000")
    auth = {"authorization": f"Bearer {key}"}

    def post(path: str, body: dict) -> requests.Response:
        return requests.post(gw.base_url + path, json={"model": ALL, **body}, headers=auth, timeout=30)

    answers = {
        "json": post("/responses", {"input": "one"}),
        "stream": post("/responses", {"input": "two", "stream": True}),
        "cached": post("/responses", {"input": "two", "stream": True}),
        "background": post("/responses", {"input": "three", "background": True}),
        "background stream": post("/responses", {"input": "four", "background": True, "stream": True}),
        "compact": post("/responses/compact", {"input": "five"}),
        "input_tokens": post("/responses/input_tokens", {"input": "six"}),
        "embeddings": post("/embeddings", {"input": "seven"}),
        "refused": post("/responses", {"input": "eight", "previous_response_id": "resp_nobody"}),
    }
    seen = {name: (r.status_code, r.headers.get("x-ratelimit-limit-requests"), r.headers.get("x-ratelimit-limit-tokens"),
                   0 <= int(r.headers.get("x-ratelimit-remaining-requests", -1)) < 100) for name, r in answers.items()}
    assert seen == {name: (400 if name == "refused" else 200, "100", "100000", True) for name in answers}, seen


def test_a_429s_wait_covers_every_limit_in_the_way_not_only_the_first(limited):
    """rpm and tpm both spent: the client is told to wait until both have refilled (it was told
    rpm's 60 s, and refused again for tpm when it came back)."""
    gw, key = limited("--rpm", "1", "--tpm", "1")
    auth = {"authorization": f"Bearer {key}"}
    first = post_turn(gw, {"model": ALL, "input": "hi"}, auth)
    assert first.status_code == 200, first.text
    used = first.json()["usage"]["total_tokens"]
    assert used > 2
    refused = post_turn(gw, {"model": ALL, "input": "hi"}, auth)
    assert refused.status_code == 429 and "(rpm)" in refused.json()["error"]["message"], refused.text
    tokens_back = (used - 1) * 60  # seconds: 1 - used tokens back above 0 at one a minute
    assert tokens_back - 5 <= int(refused.headers["retry-after"]) <= tokens_back + 1, (used, refused.headers)
    assert int(refused.headers["retry-after-ms"]) > (tokens_back - 5) * 1000


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


# --- a turn the gateway's own tool loop runs: every round is backend work -------------------------


class _Looping(QuietHandler):
    """A chat backend whose model calls the gateway's function ``name`` while it is offered and
    it has called it fewer than ``calls`` times, then answers; every round reports ``prompt``
    prompt and 10 completion tokens. A round after ``hold_after`` rounds waits for ``hold`` (a
    round in flight that its client leaves). ``bodies``: every chat request, as sent."""

    name, calls, prompt = "web_search", 5, 1000
    bodies: list[bytes] = []
    hold_after: int | None = None
    hold: threading.Event | None = None

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        if not self.path.endswith("/chat/completions"):  # (a tokenizer: none here)
            send_json(self, 404, {"error": "no such endpoint"})
            return
        me = type(self)
        me.bodies.append(body)
        n = len(me.bodies)
        if me.hold_after is not None and n > me.hold_after:
            me.hold.wait(60)
            return
        usage = {"prompt_tokens": me.prompt, "completion_tokens": 10, "total_tokens": me.prompt + 10}
        offered = any((t.get("function") or {}).get("name") == me.name for t in json.loads(body).get("tools") or ())
        if offered and n <= me.calls:
            args = {"query": f"q{n}"} if me.name == "web_search" else {"message": f"m{n}"}
            send_sse(self, chat_sse(tool_call_chunk(0, f"call_{n}", me.name, json.dumps(args)),
                                    chat_chunk(finish="tool_calls"), chat_chunk(choices=[], usage=usage)))
        else:
            send_sse(self, chat_sse(chat_chunk({"content": "done"}), chat_chunk(finish="stop"),
                                    chat_chunk(choices=[], usage=usage)))


@pytest.fixture
def looping(request, tmp_path):
    """A gateway whose client ``mallory`` has ``tpm`` 3000, in front of ``_Looping``, with the
    gateway's own tool ``request.param``: ``web_search`` (a fake Brave) or ``mcp`` (server-everything,
    its ``echo`` tool). Yields (gw, key, the tool the request offers)."""
    _Looping.bodies, _Looping.hold_after, _Looping.hold, _Looping.prompt = [], None, None, 1000
    key = run_cli(tmp_path, "keys", "add", "mallory", "--tpm", "3000").stdout.strip()
    with contextlib.ExitStack() as stack:
        backend = stack.enter_context(LocalServer(_Looping))
        if request.param == "web_search":
            from test_websearch_e2e import _Brave

            _Brave.queries, _Brave.status, _Brave.hold = [], 200, None
            brave = stack.enter_context(LocalServer(_Brave))
            _Looping.name, _Looping.calls = "web_search", 5  # (max_web_search_rounds: 5)
            env = {"BRAVE_SEARCH_API_KEY": "brave-planted-key-123456", "RESP2CHAT_BRAVE_BASE_URL": brave.url}
            tool = {"type": "web_search"}
        else:
            everything = request.getfixturevalue("everything")
            _Looping.name, _Looping.calls = "mcp__ev__echo", 5
            env = {"RESP2CHAT_MCP_SERVERS": json.dumps([{"label": "ev", "url": everything, "timeout_secs": 30}])}
            tool = {"type": "mcp", "server_label": "ev", "require_approval": "never"}
        gw = start_gateway(backend.url, tmp_path, "--set", "resp2chat_max_replay_entries=0",
                           "--set", f"resp2chat_access_log_path={tmp_path / 'access.jsonl'}",
                           env=cli_env(tmp_path, **env))
        stack.callback(gw.stop)
        yield gw, key, tool


@pytest.mark.parametrize("looping", ["web_search", "mcp"], indirect=True)
def test_tpm_spends_every_round_of_the_gateways_tool_loop(looping, tmp_path):
    """The model calls the gateway's tool 5 times: the backend answers 6 chat requests of 1000
    prompt tokens each, 6060 tokens of work for a client with tpm 3000. The client's usage is
    the turn's (the last round's prompt, every round's completion: 1060), but tpm spends all 6060
    (before: 1060, and the client's next turn was admitted with 1940 'remaining'). The metrics
    count the backends' work too, and so do the access log (its ``backend_*`` counts beside the
    client's) and ``resp2chat usage`` (before: the client's 1000, a sixth of the work)."""
    gw, key, tool = looping
    auth = {"authorization": f"Bearer {key}"}
    r = post_turn(gw, {"model": ALL, "input": "use the tool a lot", "tools": [tool]}, auth)
    assert r.status_code == 200, r.text
    assert len(_Looping.bodies) == 6
    assert r.json()["usage"]["input_tokens"] == 1000 and r.json()["usage"]["output_tokens"] == 60
    second = post_turn(gw, {"model": ALL, "input": "hi"}, auth)
    assert second.status_code == 429, (
        f"6060 backend tokens for a tpm-3000 client's turn; its next turn was admitted with "
        f"{second.headers.get('x-ratelimit-remaining-tokens')} tokens remaining")
    assert "tpm" in second.json()["error"]["message"]
    tokens = {labels: value for (name, labels), value in scrape(gw, **auth).items() if name == "resp2chat_tokens_total"}
    by_kind = {dict(labels)["kind"]: value for labels, value in tokens.items()}
    assert by_kind == {"prompt": 6000, "output": 60}, tokens
    log = tmp_path / "access.jsonl"
    wait_until(lambda: log.exists() and len(log.read_text().splitlines()) == 2, what="two access-log lines")
    looped, refused = [json.loads(line) for line in log.read_text().splitlines()]
    assert (looped["input_tokens"], looped["output_tokens"]) == (1000, 60), looped
    assert (looped["backend_input_tokens"], looped["backend_output_tokens"]) == (6000, 60), looped
    assert refused["status"] == "rejected" and "backend_input_tokens" not in refused, refused
    out = run_cli(tmp_path, "usage", str(log), "--json")
    assert out.returncode == 0, out.stderr
    total = json.loads(out.stdout)["total"]
    assert (total["turns"], total["prompt_tokens"], total["output_tokens"]) == (2, 6000, 60), total


@pytest.mark.parametrize("looping", ["web_search"], indirect=True)
def test_tpm_spends_a_round_its_client_left_by_its_size(looping):
    """The client leaves while the backend works on the turn's second round (after one search):
    the first round's usage (2010) and the second's chat request, by its size (4 bytes a token),
    come off tpm. Before: only the first round's request by its size (~30 tokens)."""
    gw, key, tool = looping
    _Looping.prompt, _Looping.hold_after, _Looping.hold = 2000, 1, threading.Event()
    try:
        with requests.post(gw.base_url + "/responses", json={"model": ALL, "input": "search", "tools": [tool],
                                                             "stream": True},
                           headers={"authorization": f"Bearer {key}"}, stream=True, timeout=30) as r:
            assert r.status_code == 200, r.text
            for line in r.iter_lines():
                if b"response.web_search_call.completed" in line:
                    break
            wait_until(lambda: len(_Looping.bodies) == 2, 10, "the second round asked")
        # (the client is gone, the backend still holds the round)
        cut = 2010 + -(-len(_Looping.bodies[1]) // 4)
        assert cut > 2200  # (the round's request holds the search results)

        def remaining() -> int:
            answer = count(gw, key)
            assert answer.status_code == 200, answer.text
            return int(answer.headers["x-ratelimit-remaining-tokens"])

        # (tpm 3000 comes back at 50 tokens a second: 3 s of slack)
        wait_until(lambda: remaining() <= 3000 - cut + 150, 10, f"the cut turn's {cut} tokens spent")
    finally:
        _Looping.hold.set()


class _Quota(QuietHandler):
    """An embeddings backend that, as OpenAI and OpenRouter do, says its own account's limits in
    ``x-ratelimit-*`` (the upstream key's: every client's together)."""

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        send_json(self, 200, {"object": "list", "model": ALL, "data": [{"object": "embedding", "index": 0,
                                                                        "embedding": [0.5]}],
                              "usage": {"prompt_tokens": 3, "total_tokens": 3}},
                  headers={"x-ratelimit-limit-requests": "10000", "x-ratelimit-remaining-requests": "9999",
                           "x-ratelimit-reset-requests": "6ms", "x-ratelimit-limit-tokens": "2000000",
                           "x-ratelimit-remaining-tokens": "1999997", "x-ratelimit-reset-tokens": "0s"})


def test_a_passthrough_answer_says_the_clients_limits_not_a_mix_with_the_backends(tmp_path):
    """carol has an ``rpm`` and no ``tpm``; her embeddings go to a backend that writes its own
    account's ``x-ratelimit-*``. Her answer says her limits alone, as her turns' answers do:
    before, it said her rpm beside the upstream account's tokens (2,000,000 a minute, the whole
    team's), one answer mixing two sources. A client without limits gets the backend's as
    they are (the only limits it has)."""
    with LocalServer(_Quota) as backend:
        carol = run_cli(tmp_path, "keys", "add", "carol", "--rpm", "5").stdout.strip()
        dave = run_cli(tmp_path, "keys", "add", "dave").stdout.strip()
        gw = start_gateway(backend.url, tmp_path, env=cli_env(tmp_path))
        try:
            mine = embed(gw, carol)
            assert mine.status_code == 200, mine.text
            said = {k: v for k, v in mine.headers.items() if k.startswith("x-ratelimit-")}
            assert said == {"x-ratelimit-limit-requests": "5", "x-ratelimit-remaining-requests": "4",
                            "x-ratelimit-reset-requests": "12s"}, said
            theirs = embed(gw, dave)
            assert theirs.headers["x-ratelimit-limit-tokens"] == "2000000"
        finally:
            gw.stop()
