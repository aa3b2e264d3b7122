"""Session affinity on a real backend fleet, the small version (the figure is `make bench`'s,
tests/llamacpp/fleet.py): a real smg router (consistent_hashing on the routing-key header) in
front of two real llama-server replicas, two gateway replicas sharing a real redis-server, and
concurrent Codex-shaped sessions whose turns alternate between the gateways. Every session's
previous prompt must come from the backends' KV cache on every later turn, by their own
``cached_tokens``: that only happens when each session stays on the replica holding its cache."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "llamacpp"))
import fleet  # noqa: E402

pytestmark = pytest.mark.llamacpp


def test_sessions_keep_their_replica_across_gateway_replicas(tmp_path):
    why = fleet.missing()
    if why:
        pytest.fail(why, pytrace=False)
    result = fleet.run_fleet(tmp_path, "consistent_hashing", sessions=4, turns=3, slots=4)
    assert result["errors"] == [], result
    for s in result["per_session"]:
        assert s["gateways"] == 2  # its turns alternated between the two gateway replicas
        assert s["share"] >= 0.99, (s, result)  # the backend's own cached_tokens
        if s["style"] == "stored":
            assert s["chained"] == 2  # previous_response_id, found in Redis by the other gateway
    assert sum(result["replica_prompt_tokens"]) > 0  # the backends did the work, through smg
