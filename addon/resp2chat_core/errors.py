"""Errors the gateway reports, in the two shapes clients understand.

Before a stream starts, an error is an HTTP status with an OpenAI error body. Once a Responses
stream has started (or the client asked for one), it is a ``response.failed`` event whose
``error.code`` is one Codex knows how to act on (see ``classify_upstream_error``) and a strict
client accepts (``response_error``: the gateway's own codes go to ``error.type``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .chatstream import LONE_SURROGATE


@dataclass
class GatewayError(Exception):
    """A request the gateway refuses; becomes ``status`` + ``{"error": {...}}``. ``retry_after``:
    the seconds the client is told to wait, when the gateway knows (its ``retry-after``: limits.py)."""

    message: str
    param: str | None = None
    code: str | None = None
    status: int = 400
    type: str = "invalid_request_error"
    retry_after: float | None = None

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_json(message: str, *, status_type: str = "invalid_request_error", param=None, code=None) -> bytes:
    return json.dumps(error_body(message, type=status_type, param=param, code=code)).encode()


# Codex 0.169's reaction to ``response.failed`` codes, as observed with the real CLI:
# context_length_exceeded, insufficient_quota and invalid_prompt end the turn with the message;
# rate_limit_exceeded is retried after the delay parsed from "try again in N s";
# server_is_overloaded is fatal with a canned "model is at capacity" text (so we never send it:
# an overloaded backend is worth retrying and its message worth showing); any other code is
# retried with its message. A 4xx other than 429 can never succeed: invalid_prompt; but a 401 or
# 403 is the backend refusing the gateway's own key (``KEY_REFUSED``): the operator's to fix.
_CONTEXT_RE = re.compile(
    r"context length|context window|maximum context|too many tokens|prompt is too long"
    r"|exceeds? the (?:available )?context|n_ctx|reduce the length",
    re.I,
)
_QUOTA_RE = re.compile(r"insufficient[_ ]quota|quota exceeded|billing|credit", re.I)

# A backend's 401, or 403, to the gateway's chat request: it refused the credentials the gateway
# sent (the operator's ``upstream_api_key``, an ``upstreams`` entry's ``api_key``: wrong, expired,
# revoked, without access to the model), not anything of the client's request. The client gets a
# ``server_error`` naming the cause (HTTP: 502 ``upstream_error``), never the backend's words (a
# 401 body may echo the key); the next upstream is tried (routing.py ``refused_key``). Not a 403
# about what the request says (OpenRouter's moderation: "your input was flagged", a content
# filter, a guardrail, a refusal: ``_CONTENT_RE``), nor a refusal of the client's own credentials
# (``forward_client_auth``: ``upstream_failure``'s ``forwarded``), which stay ``invalid_prompt``.
KEY_REFUSED = "upstream_key_refused"
REFUSED_WORDS = ("the upstream refused the gateway's credentials; the operator must check its key: upstream_api_key,"
                 " or the upstreams entry's api_key")
_CONTENT_RE = re.compile(r"moderat|flagged|content[ _-]?(?:policy|filter|management)|safety|refusal|guardrail"
                         r"|prompt[ _-]?injection|policy[ _-]?violation", re.I)


def _status_code(value: object) -> int | None:
    """An HTTP status hidden in an error's ``code`` (vLLM: ``"code": 400``; OpenRouter: 429)."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.isdigit():
        number = int(value)
    else:
        return None
    return number if 400 <= number <= 599 else None


def classify_upstream_error(status: int | None, message: str, upstream_code: object = None) -> str:
    """Map an upstream failure (HTTP status and/or message) to a Responses error code (or the
    gateway's own ``KEY_REFUSED``, a ``server_error`` to a client: ``response_error``).

    A failure reported inside a 200 stream (mid-stream ``{"error": …}``, a JSON error body
    served with 200) has no useful HTTP status; the error's own numeric ``code`` stands in.
    """
    if status is None or status < 400:
        status = _status_code(upstream_code) or status
    code = str(upstream_code or "")
    if code in ("context_length_exceeded", "insufficient_quota", "rate_limit_exceeded"):
        return code
    if _CONTEXT_RE.search(message) or code in ("exceed_context_size_error", "context_length"):
        return "context_length_exceeded"
    if status == 429:
        return "insufficient_quota" if _QUOTA_RE.search(message) else "rate_limit_exceeded"
    if status == 402 or _QUOTA_RE.search(message):
        return "insufficient_quota"
    if status == 401 or (status == 403 and not _CONTENT_RE.search(f"{message} {code}")):
        return KEY_REFUSED
    if status is not None and 400 <= status < 500:
        return "invalid_prompt"
    return "server_error"


# --- a failed Response's error -------------------------------------------------------------------
#
# The rule: a failed Response's ``error.code`` (a ``response.failed`` event, a stored or JSON
# Response) is always one a strict client accepts or one Codex acts on. openai-python types it
# as a closed enum (``types/responses/response_error.py``: ``RESPONSE_CODES``), and its model
# refuses any other; the real API's ``context_length_exceeded`` and ``insufficient_quota``,
# which that enum lacks, Codex reads (``CODEX_CODES``), so they stay. Any other code the gateway
# has for a failure (``upstream_timeout``, ``upstream_event_too_large``, ``response_too_large``,
# a conversation write's ``store_unavailable``…) becomes ``server_error``, which Codex treats as
# it treated the specific code (retried with its message), and the specific code goes to
# ``error.type`` (the SDK's "original error type", a free string; the Open Responses spec's
# error is ``code`` and ``message``, strings, and allows more). An HTTP error body (a client
# that did not stream) keeps the specific code: its ``code`` is a free string for every client.
RESPONSE_CODES = frozenset({
    "server_error", "rate_limit_exceeded", "invalid_prompt", "data_residency_mismatch", "bio_policy",
    "misalignment_policy_violation", "vector_store_timeout", "invalid_image", "invalid_image_format",
    "invalid_base64_image", "invalid_image_url", "image_too_large", "image_too_small", "image_parse_error",
    "image_content_policy_violation", "invalid_image_mode", "image_file_too_large", "unsupported_image_media_type",
    "empty_image_file", "failed_to_download_image", "image_file_not_found"})
CODEX_CODES = frozenset({"context_length_exceeded", "insufficient_quota", "rate_limit_exceeded",
                         "server_is_overloaded", "invalid_prompt"})


def response_error(code: str, message: str) -> dict:
    """A failed Response's ``error`` for the gateway's ``code`` (the rule above)."""
    if code in RESPONSE_CODES or code in CODEX_CODES:
        return {"code": code, "message": message}
    return {"code": "server_error", "message": message, "type": code}


def specific_code(error: dict) -> str:
    """The gateway's own code of a failed Response's ``error`` (``response_error``): its
    ``type`` when the code stands for it, else the code."""
    return str(error.get("type") or error.get("code") or "") if error.get("code") == "server_error" \
        else str(error.get("code") or "")


# (the whole token: a key is cut at no mark but a space, a quote or a bracket, else the rest of a
# base64 key, past its first '/' or '+', would reach the client)
_SECRET_RE = re.compile(r"(?i)(bearer\s+|api[_-]?key[\"'=: ]+|sk-)[^\s\"'`<>()\[\]{},;]{6,}")


def sanitize(text: str, limit: int = 2000) -> str:
    """Strip things that look like credentials from upstream text before a client sees it."""
    text = _SECRET_RE.sub(lambda m: m.group(1) + "[redacted]", text)
    text = LONE_SURROGATE.sub("\ufffd", text)  # (a backend's unpaired "\ud800": no UTF-8 can hold it)
    return text if len(text) <= limit else text[:limit] + "…"


def upstream_error_message(status: int | None, body: bytes) -> tuple[str, object]:
    """Pull ``(message, upstream code)`` out of whatever error body a backend sent."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    message, code = "", None
    if isinstance(data, dict):
        err = data.get("error") or data
        if isinstance(err, dict):
            message = str(err.get("message") or err.get("detail") or err.get("msg") or "")
            code = err.get("code") or err.get("type")
            meta = err.get("metadata")
            raw = meta.get("raw") if isinstance(meta, dict) else None
            if isinstance(raw, str) and raw and raw not in message:
                # OpenRouter: "Provider returned error" + the provider's own words in metadata.raw
                message = f"{message}: {raw}" if message else raw
        elif isinstance(err, str):
            message = err
        if not message and isinstance(data.get("detail"), str):
            message = data["detail"]
    if not message:
        message = text or f"upstream returned HTTP {status}"
    prefix = f"upstream HTTP {status}: " if status and status >= 400 else "upstream error: "
    return prefix + sanitize(message), code


# --- what a client sees of an upstream failure ------------------------------------------------
#
# A backend's 5xx body, and any error body that is not JSON (an HTML page from a proxy, a stack
# trace), is written for its operator: it may name hosts, paths, credentials. The client gets a
# generic message with the upstream status and the gateway's request id; the words go to the
# gateway's log and the flow (``Translator.error_detail``). A 4xx JSON error is written for the
# client (context too long, invalid request, rate limited) and keeps its text, scrubbed of
# key-like strings (``sanitize``) and of the configured keys (channel.scrub); but not a backend's
# refusal of the gateway's key (``KEY_REFUSED``): that is the operator's, and the client gets
# ``REFUSED_WORDS``. What the gateway itself observed (cannot connect, a stall, its own bug) is
# its own wording, shown as it is.


def _json_error(body: bytes) -> bool:
    """Whether a body is a JSON object carrying an error (what an API writes for its clients)."""
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and bool(data.get("error") or data.get("detail") or data.get("message"))


def for_operator_only(status: int | None, body: bytes, upstream_code: object = None) -> bool:
    """An upstream error whose text the client does not get: a 5xx (by HTTP status, or by the
    error's own numeric code inside a 200 stream) or a body that is no JSON error."""
    if status is None or status < 400:
        status = _status_code(upstream_code) or status
    return (status is not None and status >= 500) or not _json_error(body)


def withheld(status: int | None, request_id: str = "", what: str = "the upstream failed") -> str:
    """The generic message that stands for an upstream error the client does not see."""
    where = f"upstream HTTP {status}: " if status and status >= 400 else "upstream error: "
    rid = f"request id {request_id}; " if request_id else ""
    return f"{where}{what} ({rid}the gateway's log has the details)"


def gateway_failure(what: str, request_id: str = "") -> str:
    """The message for the gateway's own unexpected failure (the exception goes to the log)."""
    return f"the gateway failed to {what}" + (f" (request id {request_id})" if request_id else "")


# A backend's 404 to the chat request that says its path is not there (``path_miss``): it has no
# chat completions where the gateway asked, most often a base URL without its /v1. A 404 an API
# wrote about the request (Ollama's "model not found", OpenRouter's "No endpoints found that
# support tool use") is its own message, without the hint.
NO_SUCH_PATH = ("the backend has no chat completions where the gateway asked: is the gateway's upstream base URL"
                " right? Most servers want it to end in /v1")
# What a server's router says of a path it has no route for, as the whole message: FastAPI's
# {"detail": "Not Found"}, llama.cpp's "File Not Found", Go's "404 page not found", aiohttp's
# "404: Not Found", OpenAI's "Invalid URL (POST /chat/completions)", Express's "Cannot POST /…".
_PATH_MISS_RE = re.compile(r"(?:404:? )?(?:(?:file|page|resource|route|path|url) )?not found\.?"
                           r"|invalid url\b.*|cannot (?:post|get) /.*", re.I | re.S)


def path_miss(body: bytes) -> bool:
    """Whether a 404's body says its path is not there, not something about the request: empty,
    not JSON (an HTML page, a router's plain text), or a JSON error whose message is a router's
    (``_PATH_MISS_RE``)."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return "model" not in text.lower()  # (empty, HTML, plain text: Ollama's "model … not found" aside)
    if not isinstance(data, dict):
        return False
    message, _ = upstream_error_message(404, body)
    return bool(_PATH_MISS_RE.fullmatch(message.removeprefix("upstream HTTP 404: ").strip()))


def upstream_failure(status: int | None, body: bytes, request_id: str = "",
                     own: bool = False, forwarded: bool = False) -> tuple[str, str, str]:
    """An upstream failure as (Responses error code, the client's message, the operator's detail).

    ``own``: the relay wrote ``body`` itself (``channel.UpstreamFailed.own``): its message is
    the gateway's own wording, shown with the request id, and an error ``code`` it wrote is the
    code (relay/upstream.py ``failure``). ``forwarded``: the backend was sent the client's own
    credentials (``forward_client_auth``): its 401/403 refused them, not the gateway's key, and
    is the client's (``invalid_prompt``, the backend's words: as any other 4xx). The gateway's
    key refused (``KEY_REFUSED``): the client gets ``REFUSED_WORDS``, the operator the
    backend's words besides."""
    message, upstream_code = upstream_error_message(status, body)
    code = classify_upstream_error(status, message, upstream_code)
    if code == KEY_REFUSED and not own:
        if forwarded:
            code = "invalid_prompt"
        else:
            return code, withheld(status, request_id, REFUSED_WORDS), f"{message} ({REFUSED_WORDS})"
    wrong_url = status == 404 and not own and path_miss(body)  # (NO_SUCH_PATH)
    if wrong_url:
        message += f" ({NO_SUCH_PATH})"
    if own:
        try:
            error = json.loads(body)["error"]
            said, code = str(error["message"]), str(error.get("code") or code)
        except (ValueError, KeyError, TypeError, AttributeError):
            said = message
        return code, said + (f" (request id {request_id})" if request_id else ""), message
    if for_operator_only(status, body, upstream_code):
        return code, withheld(status, request_id, NO_SUCH_PATH if wrong_url else "the upstream failed"), message
    return code, message, message
