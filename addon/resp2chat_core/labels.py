"""Client strings where an operator reads them: metric labels, log lines, the access log, flow comments.

Rules of this file:
- Sans-I/O. A client chooses its model name, ``prompt_cache_key`` and session header, up to the
  body limit (32 MiB): none of them reaches a label, a log line or a comment unbounded.
- ``shown``: for a log line, the access log or a flow comment: at most ``SHOWN`` characters,
  printable (a newline in a model name cannot forge a log line). A longer value keeps its start
  and a digest of the whole, so two long values stay apart (a session is still followed).
- ``OPERATOR_NAME``: the shape of an operator's name (an upstream, a client, an MCP server),
  checked where it is configured; ``HEADER_NAME``: an HTTP header name an operator configures.
- ``label_safe``: what may be a Prometheus label value of its own (metrics.py decides which
  names it admits, up to its bound on how many).
"""

from __future__ import annotations

import hashlib
import re

SHOWN = 200  # characters of a client string in a log line, the access log or a flow comment
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,127}")  # a model name as backends spell them
# an operator's name for an upstream, a client or an MCP server (settings.py, clients.py, mcp.py):
# safe in metric labels, log lines and store keys as it is
OPERATOR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # (\Z: `$` takes a last newline)
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}\Z")  # an HTTP header name (RFC 9110 token)
CODE = re.compile(r"[a-z0-9_]{0,64}")  # an error code or incomplete reason


def shown(text: str, limit: int = SHOWN) -> str:
    """``text`` as a log line, the access log or a flow comment may show it."""
    if len(text) > limit:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        text = f"{text[:limit - 40]}…[{len(text)} chars, sha256 {digest}]"
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
        if len(text) > limit:
            text = text[:limit] + "…"
    return text


def label_safe(value: str) -> bool:
    """Whether a client's name may be a label value of its own."""
    return bool(LABEL.fullmatch(value))


def code_label(code: str) -> str:
    """An error code as a label value (codes are the gateway's own; anything else is ``other``)."""
    return code if CODE.fullmatch(code) else "other"
