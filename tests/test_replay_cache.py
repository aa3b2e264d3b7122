"""The replay cache through a real gateway: a hit answers what a miss would, or is no hit."""

from __future__ import annotations

import requests

from helpers import parse_sse


def test_a_hit_is_no_hit_once_what_the_request_refers_to_is_gone(upstream, gateway_factory):
    """A request that refers to stored state (``previous_response_id``, an ``item_reference``)
    and asks for nothing to be stored is answered from the cache only while that state is there:
    once it is deleted (or expired), the same request is refused as a miss refuses it, never
    answered from what the deleted response held."""
    gw = gateway_factory(upstream.origin)
    post = lambda body: requests.post(gw.base_url + "/responses", json=body, timeout=30)  # noqa: E731
    upstream.clear()
    first = post({"model": "demo-model", "input": "the secret is 42"}).json()
    item = first["output"][-1]["id"]
    asks = [{"model": "demo-model", "input": "what was it?", "previous_response_id": first["id"], "store": False},
            {"model": "demo-model", "input": [{"type": "item_reference", "id": item},
                                              {"role": "user", "content": "and again?"}],
             "store": False, "stream": True}]
    for body in asks:
        for _ in range(2):  # a miss, then a hit
            assert post(body).status_code == 200
    assert len(upstream.requests()) == 3  # (the first, one miss each)
    assert requests.delete(f"{gw.base_url}/responses/{first['id']}", timeout=30).status_code == 200
    for body in asks:
        r = post(body)
        assert r.status_code in (400, 404), r.text[:300]
        assert "not found" in r.text, r.text[:300]
    assert len(upstream.requests()) == 3
