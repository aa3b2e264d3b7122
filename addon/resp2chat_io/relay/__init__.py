"""The in-process relay between mitmproxy and the chat backends (see docs/architecture.md).

- server.py    the mitmproxy side: serves only exchanges the addon registered
- exchange.py  one turn's upstream work: a call, or the rounds of a web-search loop
- upstream.py  the backend client: pooled connections, TLS, one deadline rule, outcomes
- websocket.py the Responses WebSocket, terminated here: a registered socket's messages, in order
- constants.py what they share (``READ``)
"""

from .exchange import Exchange, SearchSettings
from .server import KEY_HEADER, TURN_HEADER, HeadRefusal, Feed, Relay
from .upstream import CallEnd, BackendUrl, UpstreamClient
from .websocket import Socket

__all__ = ["HeadRefusal", "Exchange", "Feed", "SearchSettings", "Relay", "TURN_HEADER", "KEY_HEADER", "CallEnd", "BackendUrl", "UpstreamClient",
           "Socket"]
