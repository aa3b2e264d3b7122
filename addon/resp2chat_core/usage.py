"""Chat usage (every dialect's spelling) -> Responses usage.

Codex reads ``input_tokens``/``output_tokens``/``total_tokens`` for its context meter and
auto-compaction, and ``cached_tokens`` for cost display, so the numbers must be the backend's
real ones. Where usage travels, by dialect:

- top-level ``usage`` of a chunk: OpenAI, vLLM, sglang, llama.cpp, Ollama, LM Studio, DeepSeek,
  Mistral, OpenRouter (usually a last chunk with ``choices: []``, sometimes on the finish chunk);
- ``x_groq.usage``: Groq (on the finish chunk; newer Groq also sends a top-level copy);
- ``choices[0].usage``: Moonshot/Kimi's own API.

Cached prompt tokens, first match wins: ``prompt_tokens_details.cached_tokens`` (OpenAI, vLLM
with ``--enable-prompt-tokens-details``, sglang, llama.cpp, OpenRouter, Groq, xAI, GLM);
``prompt_cache_hit_tokens`` (DeepSeek); ``cached_tokens`` at the top (Moonshot/Kimi);
``cache_read_input_tokens`` (Anthropic-style gateways); ``input_tokens_details.cached_tokens``
(Responses-style); ``timings.cache_n`` (llama.cpp builds that report it only there).
Reasoning tokens: ``completion_tokens_details.reasoning_tokens``, else a top-level
``reasoning_tokens`` (sglang).

``find_usage`` runs on every chunk and only looks; ``to_responses_usage`` runs once, when a
Response object that shows usage is written.

One reader of a Responses usage's counts as the access log and the metrics show them (input,
cached, output): ``breakdown``. One reader of a usage object's counts, in any spelling (chat's,
the Responses API's, a passthrough answer's): ``counts``. What the limits spend (``tpm``) is its total, ``tokens``: a
turn's Responses usage (addons/limits.py) and a passthrough answer's own (limits.py ``Meter``)
alike. Without a usage, one estimate, ``estimate``: ``BYTES_PER_TOKEN`` bytes a token, a part
of one counted as one (a tokenizer never makes no token of some bytes); the prompt's analysis
(prefix.py), ``POST /v1/responses/input_tokens`` without a tokenizer, a turn or a passthrough
answer cut short (what ``tpm`` spends then) all use it.

The backend tokens one chat call spent (what a client's ``tpm`` spends), one rule,
``call_tokens``: its usage's total when the backend gave one; else the estimate of its chat
request and the output it sent (the backend read the one and wrote the other); 0 for a call
that failed without any output (an error status, a backend unreachable or silent: it spent
nothing). A turn's answer call (addons/turns.py), each round of the tool loop (toolloop.py) and
server-side compaction's summary call (compaction.py) use it.
"""

from __future__ import annotations

BYTES_PER_TOKEN = 4  # the estimate's rule: 1 token = 4 bytes (of JSON, of text)


def estimate(size: int) -> int:
    """Tokens in ``size`` bytes, without a tokenizer: ``BYTES_PER_TOKEN`` bytes a token, rounded
    up (0 only for nothing)."""
    return -(-size // BYTES_PER_TOKEN)


def call_tokens(usage: object, request_bytes: int, output_chars: int, failed: bool) -> int:
    """The backend tokens one chat call spent (the rule above): ``usage``'s total (``tokens``: any
    spelling) when it is one; else ``estimate`` of ``request_bytes`` (its chat request's) plus
    ``output_chars`` (what the backend sent); 0 when it ``failed`` without any output."""
    used = tokens(usage)
    if used is not None:
        return used
    return 0 if failed and not output_chars else estimate(request_bytes + output_chars)


def counts(u: object) -> tuple[int, int, int] | None:
    """(input, output, total) tokens of a usage object in any spelling: ``prompt_tokens`` else
    ``input_tokens``, ``completion_tokens`` else ``output_tokens``, ``total_tokens`` (when it is
    not 0) else input + output. None: not a usage (no count in it at all). A count is a
    non-negative integer (a float that is one too), never a boolean; anything else counts 0."""
    if not isinstance(u, dict):
        return None
    inp = _first(u, "prompt_tokens", "input_tokens")
    out = _first(u, "completion_tokens", "output_tokens")
    total = _count(u.get("total_tokens"))
    if inp is None and out is None and total is None:
        return None
    inp, out = inp or 0, out or 0
    return inp, out, total or inp + out


def tokens(u: object) -> int | None:
    """The backend tokens a usage object counts, its total (``counts``): what ``tpm`` spends.
    None: not a usage."""
    found = counts(u)
    return None if found is None else found[2]


def breakdown(u: dict | None) -> tuple[object, object, object]:
    """(input, cached, output) tokens of a Responses usage (``to_responses_usage``'s shape) as
    the access log and the metrics read them: ``input_tokens``,
    ``input_tokens_details.cached_tokens``, ``output_tokens``; None where one is missing (or no
    usage)."""
    u = u or {}
    return u.get("input_tokens"), (u.get("input_tokens_details") or {}).get("cached_tokens"), u.get("output_tokens")


def _first(u: dict, *names: str) -> int | None:
    for name in names:
        found = _count(u.get(name))
        if found is not None:
            return found
    return None


def _count(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return None


def find_usage(chunk: dict) -> dict | None:
    """Usage at the chunk level (top-level or Groq's). Kimi's per-choice usage rides on the
    finish chunk: the translator looks there when it sees a finish_reason."""
    usage = chunk.get("usage")
    if not usage:
        x_groq = chunk.get("x_groq")
        if not x_groq:
            return None
        usage = x_groq.get("usage") if isinstance(x_groq, dict) else None
    if isinstance(usage, dict) and usage:
        timings = chunk.get("timings")
        if isinstance(timings, dict) and "cache_n" in timings and "timings" not in usage:
            usage = {**usage, "timings": timings}
        return usage
    return None


def _int(value) -> int:
    return _count(value) or 0


def _detail(u: dict, *names: str) -> dict:
    for name in names:
        value = u.get(name)
        if isinstance(value, dict):
            return value
    return {}


def summed(total: dict | None, more: dict | None) -> dict | None:
    """Two Responses usages as one (every count added; None: neither), for a turn of several
    backend calls (the tool loop's rounds, a compaction round). ``total`` is not changed."""
    if more is None or total is None:
        return more if total is None else total
    out = {**total, "input_tokens_details": dict(total["input_tokens_details"]),
           "output_tokens_details": dict(total["output_tokens_details"])}
    for name in ("input_tokens", "output_tokens", "total_tokens"):
        out[name] += more[name]
    for details in ("input_tokens_details", "output_tokens_details"):
        for name, value in more[details].items():
            out[details][name] = out[details].get(name, 0) + value
    return out


def usage_note(u: dict | None, lead: str = " · ") -> str:
    """A Responses usage as flow comments and log lines show it (``" · in 812 (cached 768) out
    31"``); "" for none."""
    if not u:
        return ""
    return f"{lead}in {u['input_tokens']} (cached {u['input_tokens_details']['cached_tokens']}) out {u['output_tokens']}"


def to_responses_usage(u: dict) -> dict:
    inp, out, total = counts(u) or (0, 0, 0)
    pdet = _detail(u, "prompt_tokens_details", "input_tokens_details")
    cdet = _detail(u, "completion_tokens_details", "output_tokens_details")
    cached = (_int(pdet.get("cached_tokens")) or _int(u.get("prompt_cache_hit_tokens"))
              or _int(u.get("cached_tokens")) or _int(u.get("cache_read_input_tokens")))
    if not cached and isinstance(u.get("timings"), dict):
        cached = _int(u["timings"].get("cache_n"))
    # Only OpenRouter-style backends report cache writes; 0 when unknown (the field is required).
    written = _int(pdet.get("cache_write_tokens")) or _int(u.get("cache_creation_input_tokens"))
    reasoning = _int(cdet.get("reasoning_tokens")) or _int(u.get("reasoning_tokens"))
    return {
        "input_tokens": inp,
        "input_tokens_details": {"cached_tokens": min(cached, inp) if inp else cached,
                                 "cache_write_tokens": written},
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": total,
    }
