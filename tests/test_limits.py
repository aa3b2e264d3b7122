"""The limits' rule alone (resp2chat_core/limits.py, sans-I/O: the time is an argument). The same
rule across replicas, through Redis, is tested end to end in test_teams.py."""

from __future__ import annotations

from resp2chat_core import limits as L


def test_rpm_is_a_bucket_that_refills_continuously():
    requests = L.Bucket.full(6, now=0.0)
    seen = [L.decide(0.0, 6, requests, None, None, 0, None) for _ in range(7)]
    assert [v.admitted for v in seen] == [True] * 6 + [False]
    assert [dict(v.headers)["x-ratelimit-remaining-requests"] for v in seen] == ["5", "4", "3", "2", "1", "0", "0"]
    refused = seen[-1]
    assert refused.why == "requests" and refused.retry_after == 10.0  # one token back every 60/6 s
    told = dict(L.retry_headers(refused.error("carol").retry_after))  # (what its refusal says: base.refusal)
    assert told["retry-after"] == "10" and told["retry-after-ms"] == "10000"
    assert dict(refused.headers)["x-ratelimit-reset-requests"] == "1m0s"  # full again in a minute
    err = refused.error("carol")
    assert (err.status, err.code) == (429, "rate_limit_exceeded") and "rpm" in str(err) and "10s" in str(err)
    assert not L.decide(9.9, 6, requests, None, None, 0, None).admitted
    assert L.decide(10.0, 6, requests, None, None, 0, None).admitted  # exactly one back
    assert requests.level < 1e-9


def test_tpm_is_spent_when_a_turn_ends_and_may_go_below_zero():
    tokens = L.Bucket.full(1000, now=0.0)
    assert L.decide(0.0, None, None, 1000, tokens, 0, None).admitted  # a turn takes no token up front
    L.spend(1.0, tokens, 1500)  # ... its usage comes off at its end, below zero
    refused = L.decide(1.0, None, None, 1000, tokens, 0, None)
    assert not refused.admitted and refused.why == "tokens"
    assert abs(refused.retry_after - 30.0) < 1e-6  # -500 back to 0 at 1000 per minute
    assert dict(refused.headers) == {"x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "0",
                                     "x-ratelimit-reset-tokens": "1m30s"}
    assert L.decide(31.1, None, None, 1000, tokens, 0, None).admitted


def test_streams_count_the_turns_open_now_and_the_first_limit_in_the_way_is_named():
    assert L.decide(0.0, None, None, None, None, 1, 2).admitted
    busy = L.decide(0.0, None, None, None, None, 2, 2)
    assert (busy.admitted, busy.why, busy.retry_after, busy.headers) == (False, "streams", 1.0, ())
    # a refused turn takes no request token
    requests = L.Bucket.full(3, now=0.0)
    assert L.decide(0.0, 3, requests, None, None, 2, 2).why == "streams" and requests.level == 3
    requests.level = 0.5
    assert L.decide(0.0, 3, requests, None, None, 2, 2).why == "requests"


def test_durations_are_written_as_openai_writes_them():
    """A full bucket resets in ``0s``, as OpenAI writes it (it was ``0ms``)."""
    assert [L.duration(s) for s in (0.0, -0.5, 0.0201, 0.999, 1.0, 6.2, 59.5, 60.0, 90.0, 3600.0)] == \
        ["0s", "0s", "21ms", "999ms", "1s", "7s", "1m0s", "1m0s", "1m30s", "60m0s"]


def test_a_passthrough_answers_usage_is_read_from_its_ends_only():
    """``Meter``: what a passthrough answer (embeddings, a chat completion passed through) spent,
    by its own ``usage``, read from the bytes kept of its start and end as it passes."""
    body = b'{"object":"list","data":[' + b"0.5," * 20000 + b'0.5],"usage":{"prompt_tokens":8,"total_tokens":8}}'
    meter = L.Meter()
    for at in range(0, len(body), 1000):
        assert meter(body[at:at + 1000]) == body[at:at + 1000]  # (passed on as it is)
    assert meter.used == 8 and len(meter.head) == len(meter.tail) == L.KEPT
    first = L.Meter()  # usage first (a backend that writes it first), a small answer
    first(b'{"usage":{"prompt_tokens":3,"completion_tokens":4},"data":[]}')
    assert first.used == 7
    stream = L.Meter()  # a chat stream: the last usage that is one (nulls before), not one inside a string
    stream(b'data: {"usage":{"prompt_tokens":5,"completion_tokens":6,"total_tokens":11}}\n\n'
           b'data: {"usage":null,"content":"say \\"usage\\": {\\"total_tokens\\": 99}"}\n\ndata: [DONE]\n\n')
    assert stream.used == 11
    cut = L.Meter()  # an answer cut before its usage ended: none
    cut(b'{"data":[],"usage":{"prompt_tokens":3,')
    assert cut.used is None


def test_one_reader_of_a_usage_and_one_estimate():
    """usage.py: every usage object (a chat chunk's, a Responses usage, a passthrough answer's) is
    read by ``counts``; what tpm spends is its total (``tokens``): the Meter's and a turn's
    alike. Without one, ``estimate``: 4 bytes a token, a part of one counted as one."""
    from resp2chat_core import usage as U

    assert [U.tokens(u) for u in ({"total_tokens": 9, "prompt_tokens": 1}, {"input_tokens": 2, "output_tokens": 3},
                                  {}, None, {"total_tokens": True}, {"prompt_tokens": 8, "input_tokens": 100},
                                  {"prompt_tokens": 4.0, "completion_tokens": -1}, {"total_tokens": 0, "input_tokens": 3},
                                  {"prompt_tokens": "12"})] == [9, 5, None, None, None, 8, 4, 3, None]
    chat = {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 112}  # (a backend's own total)
    responses = U.to_responses_usage(chat)
    assert U.counts(chat) == U.counts(responses) == (100, 10, 112)
    assert U.tokens(responses) == U.tokens(chat) == 112  # a turn spends what its passthrough twin would
    assert [U.estimate(n) for n in (0, 1, 4, 5, 8, 4001)] == [0, 1, 1, 2, 2, 1001]


def test_one_rule_for_the_backend_tokens_of_one_call():
    """usage.py ``call_tokens``: what tpm spends for one chat call (a turn's answer, a tool loop's
    round): the usage's total when the backend gave one (any spelling; even a failed call's);
    else the estimate of its chat request plus the output it sent; 0 when it failed without any
    output (a refusal, a backend unreachable: it spent nothing)."""
    from resp2chat_core import usage as U

    chat = {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 112}
    assert U.call_tokens(chat, 4000, 40, failed=False) == 112  # the backend's own total, not the estimate
    assert U.call_tokens(U.to_responses_usage(chat), 4000, 40, failed=False) == 112
    assert U.call_tokens({"input_tokens": 7, "output_tokens": 2}, 4000, 0, failed=True) == 9
    assert U.call_tokens(None, 4000, 41, failed=False) == 1011  # (4000 + 41) / 4, rounded up
    assert U.call_tokens({}, 4000, 0, failed=False) == 1000  # (no count in it: not a usage)
    assert U.call_tokens(None, 4000, 0, failed=True) == 0  # failed without output: nothing spent
    assert U.call_tokens(None, 4000, 3, failed=True) == 1001  # failed midway: what it read and wrote
    assert U.call_tokens(None, 0, 0, failed=False) == 0


def test_a_backends_retry_after_in_either_form_and_the_headers_that_pass_it_on():
    now = 1445412470.0  # 10 s before Wed, 21 Oct 2015 07:28:00 GMT
    seen = {v: L.backend_retry_after(v, now) for v in ("2", " 1.5 ", "Wed, 21 Oct 2015 07:28:00 GMT",
                                                       "Tue, 20 Oct 2015 07:28:00 GMT", "-3", "nan", "soon", "", None)}
    assert seen == {"2": "2", " 1.5 ": "1.5", "Wed, 21 Oct 2015 07:28:00 GMT": "10",
                    "Tue, 20 Oct 2015 07:28:00 GMT": "0", "-3": None, "nan": None, "soon": None, "": None, None: None}
    assert dict(L.retry_headers(L.retry_seconds("1.5"))) == {"retry-after": "2", "retry-after-ms": "1500"}
