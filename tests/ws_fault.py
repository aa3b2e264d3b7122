"""A mitmproxy script for one test (test_websocket.py): a bug of ours injected into the
WebSocket turn path, for the request whose input is "raise a bug"."""

from resp2chat_io.addons import turns

_lower = turns.Turns.lower


def lower(self, body, *args, **kwargs):
    if isinstance(body, dict) and body.get("input") == "raise a bug":
        raise RuntimeError("a bug injected by tests/ws_fault.py")
    return _lower(self, body, *args, **kwargs)


turns.Turns.lower = lower
