"""Chat usage (every dialect's spelling) -> Responses usage.

Codex reads ``input_tokens``/``output_tokens``/``total_tokens`` for its context meter and
auto-compaction, and ``cached_tokens`` for cost display, so the numbers must be the backend's
real ones. Cached prompt tokens are spelled differently per backend:
vLLM/sglang/OpenAI/llama.cpp ``prompt_tokens_details.cached_tokens``; DeepSeek
``prompt_cache_hit_tokens``; llama.cpp's ``timings.cache_n``; Groq nests usage in ``x_groq``.
"""

from __future__ import annotations


def find_usage(chunk: dict) -> dict | None:
    usage = chunk.get("usage")
    if not usage:
        x_groq = chunk.get("x_groq")
        usage = x_groq.get("usage") if isinstance(x_groq, dict) else None
    if isinstance(usage, dict):
        timings = chunk.get("timings")
        if isinstance(timings, dict) and "cache_n" in timings and "timings" not in usage:
            usage = {**usage, "timings": timings}
        return usage
    return None


def _int(value) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def to_responses_usage(u: dict) -> dict:
    inp = _int(u.get("prompt_tokens", u.get("input_tokens")))
    out = _int(u.get("completion_tokens", u.get("output_tokens")))
    pdet = u.get("prompt_tokens_details") or u.get("input_tokens_details") or {}
    cdet = u.get("completion_tokens_details") or u.get("output_tokens_details") or {}
    cached = _int(pdet.get("cached_tokens")) if isinstance(pdet, dict) else 0
    if not cached:
        cached = _int(u.get("prompt_cache_hit_tokens"))
    if not cached and isinstance(u.get("timings"), dict):
        cached = _int(u["timings"].get("cache_n"))
    # Only OpenRouter-style backends report cache writes; 0 when unknown (the field is required).
    written = _int(pdet.get("cache_write_tokens")) if isinstance(pdet, dict) else 0
    reasoning = _int(cdet.get("reasoning_tokens")) if isinstance(cdet, dict) else 0
    total = _int(u.get("total_tokens")) or inp + out
    return {
        "input_tokens": inp,
        "input_tokens_details": {"cached_tokens": min(cached, inp) if inp else cached,
                                 "cache_write_tokens": written},
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": total,
    }
