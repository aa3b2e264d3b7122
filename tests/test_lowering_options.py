"""Request-side settings for backend dialects (LoweringOptions), and that they reach mitmdump."""

from __future__ import annotations

import json

import requests

from resp2chat_core.lowering import LoweringOptions, lower
from resp2chat_core.schema import parse_request
from resp2chat_core.turn import begin_turn

HISTORY = {
    "model": "qwen3", "max_output_tokens": 99, "reasoning": {"effort": "minimal"},
    "input": [
        {"role": "user", "content": "hi"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "thinking"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "hello"}]},
        {"role": "user", "content": "again"},
    ],
}


def chat(**opts) -> dict:
    return lower(parse_request(HISTORY), LoweringOptions(**opts)).chat


def test_defaults():
    c = chat()
    assert c["max_tokens"] == 99 and c["reasoning_effort"] == "minimal"
    assert c["messages"][1] == {"role": "assistant", "content": "hello", "reasoning_content": "thinking"}


def test_history_reasoning_field():
    assert chat(history_reasoning_field="reasoning")["messages"][1] == {
        "role": "assistant", "content": "hello", "reasoning": "thinking"}
    assert chat(history_reasoning_field="none")["messages"][1] == {"role": "assistant", "content": "hello"}


def test_max_tokens_field_and_effort_map():
    c = chat(max_tokens_field="max_completion_tokens", reasoning_effort_map={"minimal": "low"})
    assert "max_tokens" not in c and c["max_completion_tokens"] == 99 and c["reasoning_effort"] == "low"
    assert "reasoning_effort" not in chat(reasoning_effort_map={"minimal": ""})


def test_model_extra_params_merge_one_level_after_global():
    c = chat(upstream_extra_params={"chat_template_kwargs": {"enable_thinking": False}, "top_k": 20},
             model_extra_params={"qwen3": {"chat_template_kwargs": {"reasoning_budget": 512}, "top_k": 40},
                                 "other": {"top_k": 1}})
    assert c["chat_template_kwargs"] == {"enable_thinking": False, "reasoning_budget": 512}
    assert c["top_k"] == 40
    # keyed by the *upstream* model name, after model_map
    mapped = chat(model_map={"qwen3": "other"}, model_extra_params={"other": {"top_k": 1}})
    assert mapped["model"] == "other" and mapped["top_k"] == 1


def test_think_mode_per_upstream_model():
    opts = LoweringOptions(think_tags={"qwen3": "open", "*": "off"})
    turn = begin_turn(json.dumps(HISTORY).encode(), opts, "resp_x", 0)
    assert turn.ctx.think == "open"
    other = begin_turn(json.dumps({**HISTORY, "model": "m"}).encode(), opts, "resp_x", 0)
    assert other.ctx.think == "off"
    assert begin_turn(json.dumps(HISTORY).encode(), LoweringOptions(), "resp_x", 0).ctx.think == "auto"


def test_settings_reach_the_upstream(upstream, gateway_factory):
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_tokens_field=max_completion_tokens",
                         "--set", "resp2chat_history_reasoning_field=reasoning",
                         "--set", 'resp2chat_model_extra_params={"qwen3": {"top_k": 7}}')
    upstream.clear()
    r = requests.post(gw.base_url + "/responses", json=HISTORY, timeout=30)
    assert r.status_code == 200
    got = upstream.requests()[-1]
    assert got["max_completion_tokens"] == 99 and got["top_k"] == 7
    assert got["messages"][1]["reasoning"] == "thinking"
