"""Issue 21: what a client can hold on the gateway's own port without sending a request.

The rule alone here (resp2chat_core/head_deadline.py); through a real mitmdump in the next commit.
"""

from __future__ import annotations

from resp2chat_core.head_deadline import HeadDeadline


# --- the rule alone (resp2chat_core/head_deadline.py) ------------------------------------------


def test_the_rule_waits_from_connect_and_from_each_answers_end():
    clock = HeadDeadline(limit=10, cap=100)
    clock.connected("a", 0)
    clock.connected("b", 5)
    assert clock.overdue(9.9) == [] and clock.overdue(10) == ["a"] and clock.overdue(15) == ["a", "b"]
    clock.head("a", "r1")  # a head is in: no deadline while its answer runs, however long
    assert clock.overdue(1000) == ["b"] and len(clock) == 1
    clock.head("a", "r2")  # (two in flight, as HTTP/2 could)
    clock.ended("a", "r1", 1000)
    assert clock.overdue(2000) == ["b"]
    clock.ended("a", "r2", 1001)  # the last answer ended: waits from there
    assert clock.overdue(1010) == ["b"] and clock.overdue(1011) == ["b", "a"]
    clock.waiting("a", 1011)  # (still writing: its clock starts again)
    assert clock.overdue(1020) == ["b"]
    clock.gone("b")
    assert clock.overdue(5000) == ["a"] and "b" not in clock
    clock.ended("b", "r9", 5000)  # (a hook after the close: nothing comes back)
    clock.head("b", "r9")
    assert "b" not in clock and clock.overdue(9000) == ["a"]
    clock.limit = 0  # no deadline
    assert clock.overdue(10 ** 9) == []


def test_the_rule_closes_the_oldest_waiting_past_the_cap():
    clock = HeadDeadline(limit=10, cap=2)
    assert clock.connected("a", 0) == [] and clock.connected("b", 1) == []
    clock.head("a", "r")  # busy: does not count
    assert clock.connected("c", 2) == []
    assert clock.connected("d", 3) == ["b"] and "b" not in clock
    clock.ended("a", "r", 4)  # waits again, the newest
    assert clock.connected("e", 5) == ["c", "d"]
    assert len(clock) == 2 and clock.overdue(100) == ["a", "e"]
