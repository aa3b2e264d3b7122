"""resp2chat's I/O side: everything around the core that touches sockets, files, processes or
mitmproxy — the upstream relay, the response store, config files, the CLI, mitmweb views, and
the demo upstream."""

from pathlib import Path

ADDON = Path(__file__).resolve().parent.parent / "resp2chat.py"  # the script mitmdump loads (-s): the CLI, start()
META = "resp2chat"  # flow.metadata key of a turn's record: saved in flow files, read by the views, analyze, retranslate


def __getattr__(name: str):
    """``resp2chat_io.start(...)``: run a gateway from Python (api.py), imported on first use.
    ``GatewayError``: the old name of ``StartError`` (README named it), still answered."""
    if name in ("start", "Gateway", "StartError", "GatewayError"):
        from . import api

        return getattr(api, "StartError" if name == "GatewayError" else name)
    raise AttributeError(f"module 'resp2chat_io' has no attribute {name!r}")
