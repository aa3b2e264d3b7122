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
"""

from __future__ import annotations


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
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value if value >= 0 else 0
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return 0


def _detail(u: dict, *names: str) -> dict:
    for name in names:
        value = u.get(name)
        if isinstance(value, dict):
            return value
    return {}


def usage_note(u: dict | None, lead: str = " · ") -> str:
    """A Responses usage as flow comments and log lines show it (``" · in 812 (cached 768) out
    31"``); "" for none."""
    if not u:
        return ""
    return f"{lead}in {u['input_tokens']} (cached {u['input_tokens_details']['cached_tokens']}) out {u['output_tokens']}"


def to_responses_usage(u: dict) -> dict:
    inp = _int(u.get("prompt_tokens", u.get("input_tokens")))
    out = _int(u.get("completion_tokens", u.get("output_tokens")))
    pdet = _detail(u, "prompt_tokens_details", "input_tokens_details")
    cdet = _detail(u, "completion_tokens_details", "output_tokens_details")
    cached = (_int(pdet.get("cached_tokens")) or _int(u.get("prompt_cache_hit_tokens"))
              or _int(u.get("cached_tokens")) or _int(u.get("cache_read_input_tokens")))
    if not cached and isinstance(u.get("timings"), dict):
        cached = _int(u["timings"].get("cache_n"))
    # Only OpenRouter-style backends report cache writes; 0 when unknown (the field is required).
    written = _int(pdet.get("cache_write_tokens")) or _int(u.get("cache_creation_input_tokens"))
    reasoning = _int(cdet.get("reasoning_tokens")) or _int(u.get("reasoning_tokens"))
    total = _int(u.get("total_tokens")) or inp + out
    return {
        "input_tokens": inp,
        "input_tokens_details": {"cached_tokens": min(cached, inp) if inp else cached,
                                 "cache_write_tokens": written},
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": total,
    }
