"""The limits' rule (resp2chat_core/limits.py) under random sequences of turns, token usages and
waits, the clock moved by hand: what a client is told always agrees with what is decided.

- ``x-ratelimit-remaining-*`` is never negative nor above ``x-ratelimit-limit-*``;
- a turn is refused (429) iff a bucket lacks what it needs (a whole request token; more than
  no token) or ``max_streams`` turns are open, and the headers say so (remaining 0 for the
  limit in the way);
- ``Retry-After`` and ``retry-after-ms`` are whole positive numbers, and a client that waits
  either (its turns ended: a stream's wait is a guess) is admitted: not refused again by
  another bucket that was also in the way.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import re
import string

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from resp2chat_core import limits as L
from resp2chat_core import owner
from resp2chat_core.clients import LIMITS, parse_clients
from resp2chat_core.labels import OPERATOR_NAME
from resp2chat_core.settings_error import SettingsError
from resp2chat_io import limit_state
from resp2chat_io.limit_state import LocalLimits, RedisLimits
from resp2chat_io.redis_state import KEY_ROOT, RedisState
from resp2chat_io.store import Writes

NAME_CHARS = string.ascii_letters + string.digits + "_.-"  # (a name: labels.OPERATOR_NAME)
ID_CHARS = string.ascii_letters + string.digits + "_-"
DURATION = re.compile(r"^(?:\d+ms|(?:\d+m)?\d+s)$")

steps = st.lists(st.one_of(
    st.tuples(st.just("turn")),
    st.tuples(st.just("end"), st.integers(0, 8), st.integers(0, 1500)),  # one open turn ends, its tokens
    st.tuples(st.just("wait"), st.floats(0, 90, allow_nan=False)),
), max_size=30)


def _level(bucket: L.Bucket, now: float) -> float:
    return min(bucket.capacity, bucket.level + max(0.0, now - bucket.at) * bucket.capacity / L.WINDOW)


def _told(verdict: L.Verdict) -> tuple[int, int]:
    told = dict(L.retry_headers(verdict.error("carol").retry_after))
    assert told.keys() == {"retry-after", "retry-after-ms"}
    assert told["retry-after"].isdigit() and told["retry-after-ms"].isdigit(), told
    return int(told["retry-after"]), int(told["retry-after-ms"])


@settings(derandomize=True, max_examples=400, deadline=None, database=None)
@given(rpm=st.none() | st.integers(1, 6), tpm=st.none() | st.integers(1, 300),
       max_streams=st.none() | st.integers(1, 3), sequence=steps)
def test_what_a_client_is_told_agrees_with_what_is_decided(rpm, tpm, max_streams, sequence):
    now = 1000.0
    requests = L.Bucket.full(rpm, now) if rpm is not None else None
    tokens = L.Bucket.full(tpm, now) if tpm is not None else None
    open_turns: list[int] = []
    for step in sequence:
        if step[0] == "wait":
            now += step[1]
            continue
        if step[0] == "end":
            if open_turns:
                open_turns.pop(step[1] % len(open_turns))
                if tokens is not None:
                    L.spend(now, tokens, step[2])
            continue
        need_r = _level(requests, now) >= 1 if requests is not None else True
        need_t = _level(tokens, now) > 0 if tokens is not None else True
        room = max_streams is None or len(open_turns) < max_streams
        verdict = L.decide(now, rpm, requests, tpm, tokens, len(open_turns), max_streams)
        assert verdict.admitted == (need_r and need_t and room), (verdict, need_r, need_t, room)
        heads = dict(verdict.headers)
        for limit, kind, bucket in ((rpm, "requests", requests), (tpm, "tokens", tokens)):
            if limit is None:
                assert f"x-ratelimit-limit-{kind}" not in heads
                continue
            assert heads[f"x-ratelimit-limit-{kind}"] == str(limit)
            assert 0 <= int(heads[f"x-ratelimit-remaining-{kind}"]) <= limit, heads
            assert DURATION.match(heads[f"x-ratelimit-reset-{kind}"]), heads
            if not verdict.admitted and verdict.why == kind:
                assert heads[f"x-ratelimit-remaining-{kind}"] == "0", heads
        if verdict.admitted:
            open_turns.append(1)
            continue
        assert verdict.why == ("requests" if not need_r else "tokens" if not need_t else "streams")
        seconds, ms = _told(verdict)
        assert seconds >= 1 and ms >= 1 and seconds * 1000 >= ms
        for waited in (ms / 1000, float(seconds)):  # (the openai SDK reads retry-after-ms, others retry-after)
            later_r, later_t = copy.deepcopy(requests), copy.deepcopy(tokens)
            assert L.decide(now + waited, rpm, later_r, tpm, later_t, 0, max_streams).admitted, \
                (verdict, waited, later_r, later_t)


def test_a_wait_covers_every_bucket_in_the_way_not_only_the_first():
    """The case the property found: a request token back in 60 s, the tokens back in 120 s: the
    client was told 60, and refused again (for tpm) when it came back."""
    requests, tokens = L.Bucket.full(1, 0.0), L.Bucket.full(1, 0.0)
    assert L.decide(0.0, 1, requests, 1, tokens, 0, None).admitted
    L.spend(0.0, tokens, 3)  # (two below zero)
    refused = L.decide(0.0, 1, requests, 1, tokens, 0, None)
    assert refused.why == "requests" and 120.0 <= refused.retry_after < 120.01
    assert not L.decide(60.0, 1, copy.deepcopy(requests), 1, copy.deepcopy(tokens), 0, None).admitted
    assert L.decide(120.01, 1, requests, 1, tokens, 0, None).admitted


# --- a limit's value: refused when configured, or one every request can be decided with ----------

limit_values = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(1, 10**15), st.integers(10**300, 10**400),
    st.floats(allow_nan=True), st.text(max_size=5), st.lists(st.integers(0, 3), max_size=2))


@settings(derandomize=True, max_examples=150, deadline=None, database=None)
@given(values=st.fixed_dictionaries({k: limit_values for k in LIMITS}))
def test_a_limit_is_refused_at_configure_time_or_every_request_is_decided(values):
    entry = {"name": "carol", "key": "k" * 20, **values}
    try:
        spec, = parse_clients([entry])
    except SettingsError as err:
        assert str(err).startswith("clients[0] ('carol').") and "whole number" in str(err), err
        return
    state = LocalLimits()
    for n in range(3):
        verdict, ticket = asyncio.run(state.admit(spec, f"t{n}"))
        for name, value in verdict.headers:
            assert re.fullmatch(r"\d+|\d+ms|(?:\d+m)?\d+s", value), (name, value)
        if not verdict.admitted:
            _told(verdict)
        if ticket is not None:
            ticket.release(spec.tpm, 10**6)


# --- the same rule in this process and in Redis (a real redis-server) -----------------------------
#
# Levels start whole and turns take whole tokens; the clock is real, but a test of a few seconds
# refills less than one token (rpm <= 3, tpm <= 9), and tokens are spent two at a time from an odd
# tpm, so no level sits on a threshold: both stores must decide every turn alike.

names = itertools.count()
redis_steps = st.lists(st.one_of(
    st.tuples(st.just("turn")),
    st.tuples(st.just("end"), st.integers(0, 5), st.sampled_from((0, 2, 4))),
), max_size=14)


def _figures(verdict: L.Verdict) -> tuple:
    heads = dict(verdict.headers)
    return verdict.admitted, verdict.why, heads.get("x-ratelimit-remaining-requests"), \
        heads.get("x-ratelimit-remaining-tokens")


async def _side_by_side(url: str, spec, sequence) -> None:
    state, writes = RedisState(url), Writes()
    stores = {"memory": LocalLimits(), "redis": RedisLimits(state, LocalLimits(), writes)}
    open_turns: dict[str, list] = {"memory": [], "redis": []}
    try:
        for n, step in enumerate(sequence):
            if step[0] == "end":
                for where in stores:
                    if open_turns[where]:
                        open_turns[where].pop(step[1] % len(open_turns[where])).release(spec.tpm, step[2])
                await writes.landed()
                continue
            seen = {}
            for where, store in stores.items():
                verdict, ticket = await store.admit(spec, f"turn{n}")
                seen[where] = _figures(verdict)
                assert (ticket is not None) == verdict.admitted
                if ticket is not None:
                    assert ticket.home is store  # (Redis answered: not the fallback)
                    open_turns[where].append(ticket)
            assert seen["memory"] == seen["redis"], (n, seen)
        for where in stores:  # every turn ends: nothing stays open, anywhere
            for ticket in open_turns[where]:
                ticket.release(spec.tpm, 2)
        await writes.landed()
        assert not any(c.open for c in stores["memory"]._clients.values())
        assert await state.client.zcard(f"{KEY_ROOT}limits:{spec.identity}:streams") == 0
    finally:
        await state.close()


@settings(derandomize=True, max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rpm=st.none() | st.integers(1, 3), tpm=st.none() | st.sampled_from((1, 3, 5, 9)),
       max_streams=st.none() | st.integers(1, 2), sequence=redis_steps)
def test_this_process_and_redis_decide_alike_and_nothing_stays_open(rpm, tpm, max_streams, sequence, redis_server):
    spec, = parse_clients([{"name": f"c{next(names)}", "key": "k" * 20, "rpm": rpm, "tpm": tpm,
                            "max_streams": max_streams}])
    asyncio.run(_side_by_side(redis_server.url, spec, sequence))


def test_a_long_turn_keeps_counting_in_redis_while_its_replica_refreshes_it(redis_server, monkeypatch):
    """An open turn outlived its streams key: the heartbeat refreshed the turn's score but never
    the key's expiry (2 leases after the client's last admission), so a turn longer than that (3
    minutes) stopped counting and max_streams let another in. The lease shortened to 1 s."""
    monkeypatch.setattr(limit_state, "LEASE", 1.0)
    spec, = parse_clients([{"name": "carol", "key": "k" * 20, "max_streams": 1}])

    async def run() -> None:
        state, writes = RedisState(redis_server.url), Writes()
        redis = RedisLimits(state, LocalLimits(), writes)
        try:
            verdict, ticket = await redis.admit(spec, "long")
            assert verdict.admitted
            for _ in range(8):  # 3.2 s: past the key's 2 s, the turn refreshed every 0.4 s
                await asyncio.sleep(0.4)
                await redis.refresh([ticket])
            busy, none = await redis.admit(spec, "next")
            assert (busy.admitted, busy.why, none) == (False, "streams", None)
            ticket.release(None, 0)
            await writes.landed()
            verdict, later = await redis.admit(spec, "next")
            assert verdict.admitted and later.home is redis
        finally:
            await state.close()

    asyncio.run(run())


def test_a_debt_of_tokens_outlives_an_hour_in_redis(redis_server):
    """A turn may spend many minutes of a client's tpm (a long prompt, a small tpm): its Redis
    key expired an hour after the client's last request, and an expired key is a full bucket:
    the debt was forgiven there, never in this process."""
    spec, = parse_clients([{"name": "carol", "key": "k" * 20, "tpm": 10}])

    async def run() -> None:
        state, writes = RedisState(redis_server.url), Writes()
        redis = RedisLimits(state, LocalLimits(), writes)
        key = f"{KEY_ROOT}limits:{spec.identity}"
        try:
            verdict, ticket = await redis.admit(spec, "big")
            ticket.release(spec.tpm, 2010)  # 2000 below zero: 200 minutes at 10 a minute
            await writes.landed()
            assert await state.client.ttl(key) >= 200 * 60
            refused, _ = await redis.admit(spec, "again")  # (a refused request writes the key too)
            assert not refused.admitted and refused.retry_after > 199 * 60
            assert await state.client.ttl(key) >= 199 * 60
        finally:
            await state.close()

    asyncio.run(run())


@settings(derandomize=True, max_examples=200, deadline=None, database=None)
@given(name=st.integers(0, 63).flatmap(lambda n: st.text(NAME_CHARS, min_size=n + 1, max_size=n + 1)),
       ident=st.none() | st.integers(16, 48).flatmap(lambda n: st.text(ID_CHARS, min_size=n, max_size=n)))
def test_every_client_the_config_takes_has_an_identity(name, ident):
    """A name of 58 to 64 characters without an id (written by hand) was taken, and every request
    of its client failed: ``client.`` + the name was not an owner."""
    assume(OPERATOR_NAME.match(name))
    entry = {"name": name, "key": "k" * 20, "tpm": 5, **({"id": ident} if ident is not None else {})}
    spec, = parse_clients([entry])
    assert owner.check(spec.identity) == spec.identity
    verdict, ticket = asyncio.run(LocalLimits().admit(spec, "t"))
    assert verdict.admitted and ticket.key == spec.identity
