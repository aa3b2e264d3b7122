"""Byte-level fuzzing through a real mitmdump (tests/fuzz.py has the rules): the findings kept as
regression fixtures (tests/fixtures/fuzz/), then a seeded, bounded run of fresh mutations.
`make fuzz` runs the long version with a random seed."""

from __future__ import annotations

import json

import pytest

import fuzz

SEED, CASES = 1, 600  # ~15 s here; the bound is the count, so a slow machine runs the same cases
WS_CASES = 300  # the WebSocket mode: the same mutations as messages on one socket


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    recorder, gw = fuzz.start(tmp_path_factory.mktemp("fuzz"))
    yield recorder, gw
    gw.stop()
    recorder.close()


REGRESSIONS = fuzz.regressions()


def assert_as_kept(name, want, out, problem):
    """The answer a kept finding expects: its status, and for a refusal its code and message."""
    assert problem is None, f"{name} ({want['found']}): {problem}"
    statuses = want["status"] if isinstance(want["status"], list) else [want["status"]]
    assert out.status in statuses, out.body[:300]
    if out.status != 200:
        error = json.loads(out.body)["error"]
        assert error["code"] == want.get("code", error["code"])
        assert want.get("message", "") in error["message"]


@pytest.mark.parametrize("name, case, want", REGRESSIONS, ids=[r[0] for r in REGRESSIONS])
def test_kept_findings_stay_fixed(fuzzed, name, case, want):
    recorder, gw = fuzzed
    out, problem = fuzz.check(gw.base_url, recorder, case)
    assert_as_kept(name, want, out, problem)


def test_every_kept_finding_is_explained():
    assert len(REGRESSIONS) >= 10
    for name, case, want in REGRESSIONS:
        assert want["found"] and want["status"], name


def test_seeded_byte_fuzzing_through_mitmdump(fuzzed, tmp_path):
    recorder, gw = fuzzed
    report = fuzz.fuzz(gw.base_url, recorder, SEED, CASES, findings=tmp_path / "findings")
    found = "\n".join(f"  {case.name} ({len(case.body)} bytes): {problem}" for case, problem in report.findings)
    assert not report.findings, f"{len(report.findings)} findings (minimized in {tmp_path / 'findings'}):\n{found}"
    assert report.cases == CASES and gw.proc.poll() is None
    # the mutations reach every outcome: served, refused, too large
    assert {200, 400, 413} <= set(report.statuses), report.statuses


# the kept findings that do not rest on HTTP headers (a message has none), as messages
AS_MESSAGES = [r for r in REGRESSIONS if "content-encoding" not in r[1].headers]


@pytest.mark.parametrize("name, case, want", AS_MESSAGES, ids=[r[0] for r in AS_MESSAGES])
def test_kept_findings_stay_fixed_as_websocket_messages(fuzzed, name, case, want):
    recorder, gw = fuzzed
    socket = fuzz.Socket(gw.base_url)
    try:
        out, problem = fuzz.check(gw.base_url, recorder, fuzz.Case(name, fuzz.as_message(case.body)), socket=socket)
    finally:
        socket.close()
    assert_as_kept(name, want, out, problem)  # byte offsets included: the body's come first


def test_seeded_byte_fuzzing_over_the_websocket(fuzzed, tmp_path):
    recorder, gw = fuzzed
    report = fuzz.fuzz(gw.base_url, recorder, SEED, WS_CASES, findings=tmp_path / "findings", websocket=True)
    found = "\n".join(f"  {case.name} ({len(case.body)} bytes): {problem}" for case, problem in report.findings)
    assert not report.findings, f"{len(report.findings)} findings (minimized in {tmp_path / 'findings'}):\n{found}"
    assert report.cases == WS_CASES and gw.proc.poll() is None
    assert {200, 400, 413} <= set(report.statuses), report.statuses
