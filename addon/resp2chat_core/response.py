"""The Response object: one builder for every place a client sees one.

A Response object is what a stream's ``response.created``/``in_progress``/``completed``/
``failed``/``incomplete`` events carry (over HTTP and the WebSocket), the JSON body a client that
did not stream gets, what ``GET /v1/responses/{id}`` answers (the stored final one), and what a
later background or compaction response will be. All of them come from ``response_json`` here,
so they cannot disagree, and every one carries each field the Open Responses specification's
``ResponseResource`` requires (tests/helpers.py ``check_spec`` checks it), with its type.

Two halves, so the per-event path stays cheap (the translator writes a Response object several
times per turn, one of them per keepalive):

- what the *request* decided, once per turn (``echo`` / ``echo_json``, at ``begin_turn``): the
  fields the API echoes back, with the API's documented defaults for what the request left out,
  encoded once as JSON members without braces;
- what the *turn* decided, at each event (``response_json``): id, created_at, status,
  completed_at, error, incomplete_details, model, output, usage.

The echoed fields, in the order written (the turn's own come first):

| field | value |
| --- | --- |
| ``background`` | the request's, else ``false`` |
| ``conversation`` | ``{"id": …}`` when the request names one (absent otherwise) |
| ``frequency_penalty``, ``presence_penalty`` | the request's, else what the backend was given (``upstream_extra_params``…), else ``0.0`` |
| ``instructions``, ``max_output_tokens``, ``max_tool_calls``, ``previous_response_id``, ``prompt_cache_key``, ``safety_identifier``, ``user`` | the request's, else ``null`` |
| ``metadata`` | the request's, else ``{}`` |
| ``parallel_tool_calls`` | the request's, else ``true`` |
| ``reasoning`` | ``{"effort", "summary"}`` of the request's, else ``null`` |
| ``service_tier`` | the request's, else (and for ``auto``) ``"default"`` |
| ``store`` | the request's, else ``true`` |
| ``temperature``, ``top_p`` | the request's, else what the backend was given, else ``1.0`` |
| ``text`` | ``{"format": …}`` (``{"type": "text"}`` by default; a ``json_schema`` format with its ``name``, ``description``, ``schema`` and ``strict``), ``verbosity`` when given |
| ``tool_choice`` | the request's (a Chat-style ``{"type": "function", "function": {"name"}}`` as the Responses ``{"type": "function", "name"}``; ``allowed_tools`` with its ``mode``), else ``"auto"`` |
| ``tools`` | the request's, each ``function`` tool with ``description``, ``parameters`` and ``strict`` (``null`` when not given) |
| ``top_logprobs`` | the request's, else ``0`` |
| ``truncation`` | the request's, else ``"disabled"`` |

Pure and byte-deterministic: the same request gives the same bytes.
"""

from __future__ import annotations

import json

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # as lowering and the translator write

DEFAULT_TEMPERATURE = 1.0  # the API's documented defaults, shown when neither the request nor the backend's
DEFAULT_TOP_P = 1.0  # parameters say (the backend then samples with its own defaults, which it does not report)
DEFAULT_PENALTY = 0.0
DEFAULT_SERVICE_TIER = "default"
# how a response ended that is kept to go on from (the store, a WebSocket's memory): an incomplete one
# too, as OpenAI keeps it (a client continues after max_output_tokens with previous_response_id)
CONTINUABLE = ("completed", "incomplete")
# how a response ended that the store keeps (``store`` true): a failed one too, as OpenAI keeps it (a GET
# shows its status and error), though it is not gone on from (addons/store.py ``lookup``)
STORED = CONTINUABLE + ("failed",)


def _number(value) -> bool:
    return value.__class__ in (int, float)


def _sampling(name: str, req, chat: dict | None, default: float):
    """A sampling parameter: the request's, else what the backend was given, else ``default``."""
    value = getattr(req, name, None)
    if value is None and chat is not None:
        value = chat.get(name)
    return value if _number(value) else default


def echo_tools(tools) -> list:
    """The request's tools as a Response shows them: a ``function`` tool carries ``description``,
    ``parameters`` and ``strict`` (``null`` when the request did not give them), the other kinds
    as they came."""
    if not isinstance(tools, list):
        return []
    out = []
    for tool in tools:
        if isinstance(tool, dict) and tool.get("type") == "function":
            tool = {**tool, "description": tool.get("description"), "parameters": tool.get("parameters"),
                    "strict": tool.get("strict")}
        out.append(tool)
    return out


def echo_tool_choice(choice):
    """``tool_choice`` as a Response shows it (``"auto"`` when absent)."""
    if choice is None:
        return "auto"
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "function" and "name" not in choice and isinstance(choice.get("function"), dict):
            return {"type": "function", "name": choice["function"].get("name")}  # the Chat Completions spelling
        if kind == "allowed_tools" and "mode" not in choice:
            return {**choice, "mode": "auto"}
    return choice


def _text(text) -> dict:
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        fmt = {"type": "text"}
    elif fmt.get("type") == "json_schema":
        fmt = {**fmt, "name": fmt.get("name") or "response", "description": fmt.get("description"),
               "schema": fmt.get("schema"), "strict": bool(fmt.get("strict"))}
    out = {"format": fmt}
    if isinstance(text, dict) and text.get("verbosity") is not None:
        out["verbosity"] = text["verbosity"]
    return out


def _reasoning(reasoning) -> dict | None:
    if not isinstance(reasoning, dict):
        return None
    return {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")}


def _conversation(conversation) -> dict | None:
    if isinstance(conversation, str):
        return {"id": conversation}
    if isinstance(conversation, dict) and isinstance(conversation.get("id"), str):
        return {"id": conversation["id"]}
    return None


def _or(value, default):
    return default if value is None else value


def echo(raw: dict, req, chat: dict | None = None, tools=None) -> dict:
    """The echoed fields (the module's table) of a request: ``raw`` as the client sent it (before
    ``previous_response_id`` was resolved), ``req`` its validated model (schema.py: typed scalars),
    ``chat`` the chat request its first backend is given (the values sampling parameters fall back
    to). ``tools``: what to put under ``tools`` instead of ``echo_tools(raw["tools"])`` (the
    encoded tools, spliced in by the caller)."""
    service_tier = getattr(req, "service_tier", None)
    out = {
        "background": bool(getattr(req, "background", None)),
        "frequency_penalty": _sampling("frequency_penalty", req, chat, DEFAULT_PENALTY),
        "instructions": raw.get("instructions"),
        "max_output_tokens": getattr(req, "max_output_tokens", None),
        "max_tool_calls": getattr(req, "max_tool_calls", None),
        "metadata": _or(raw.get("metadata"), {}),
        "parallel_tool_calls": _or(getattr(req, "parallel_tool_calls", None), True),
        "presence_penalty": _sampling("presence_penalty", req, chat, DEFAULT_PENALTY),
        "previous_response_id": raw.get("previous_response_id"),
        "prompt_cache_key": getattr(req, "prompt_cache_key", None),
        "reasoning": _reasoning(raw.get("reasoning")),
        "safety_identifier": getattr(req, "safety_identifier", None),
        "service_tier": DEFAULT_SERVICE_TIER if service_tier in (None, "auto") else service_tier,
        "store": raw.get("store") is not False,
        "temperature": _sampling("temperature", req, chat, DEFAULT_TEMPERATURE),
        "text": _text(raw.get("text")),
        "tool_choice": echo_tool_choice(raw.get("tool_choice")),
        "tools": echo_tools(raw.get("tools")) if tools is None else tools,
        "top_logprobs": _or(getattr(req, "top_logprobs", None), 0),
        "top_p": _sampling("top_p", req, chat, DEFAULT_TOP_P),
        "truncation": _or(raw.get("truncation"), "disabled"),
        "user": getattr(req, "user", None),
    }
    conversation = _conversation(raw.get("conversation"))
    if conversation is not None:
        out = {"background": out.pop("background"), "conversation": conversation, **out}
    return out


def as_stored(response: dict) -> dict:
    """A Response as it is stored and a GET shows it: its ``error`` with the schema's fields
    alone. A wait's ``headers`` are the ``response.failed`` event's (Codex reads them there), out
    of date once it went out (a live turn's, ``Translator.response``; a replayed recording's,
    ``websocket.final_response``)."""
    error = response.get("error")
    if isinstance(error, dict) and "headers" in error:
        return {**response, "error": {k: v for k, v in error.items() if k != "headers"}}
    return response


def echo_json(echoed: dict) -> str:
    """``echo``'s fields as JSON members, without the braces (what ``response_json`` appends)."""
    return _dumps(echoed)[1:-1]


DEFAULT_ECHO_JSON = echo_json(echo({}, None))  # what a request that says nothing gets echoed


def response_json(response_id: str, created_at: int, status: str, model_json: str, echoed: str | None, *,
                  completed_at: int | None = None, error: dict | None = None, incomplete: dict | None = None,
                  output_json: str = "[]", usage: dict | None = None) -> str:
    """A whole Response object, as JSON text: the turn's fields, then ``echoed`` (``echo_json``).
    ``model_json``: the model name, encoded; ``output_json``: the output items, encoded.
    ``echoed`` None: the text up to where the echo goes, without the closing brace (the
    translator splices the echo in, encoded once a turn)."""
    return (
        f'{{"id":"{response_id}","object":"response","created_at":{created_at},"status":"{status}",'
        f'"completed_at":{"null" if completed_at is None else completed_at},'
        f'"error":{"null" if error is None else _dumps(error)},'
        f'"incomplete_details":{"null" if incomplete is None else _dumps(incomplete)},'
        f'"model":{model_json},"output":{output_json},"usage":{"null" if usage is None else _dumps(usage)}'
        + (f",{echoed}}}" if echoed else "" if echoed is None else "}")
    )
