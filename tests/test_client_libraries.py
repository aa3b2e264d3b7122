"""Third-party Responses clients, as people build with them, against a real mitmdump in front of
the scripted upstream: the Vercel AI SDK (JavaScript, `ai` with `@ai-sdk/openai`, and with
`@ai-sdk/open-responses`, its provider for Open Responses servers), the OpenAI Agents
SDK (`openai-agents`), LangChain (`langchain-openai`, ``use_responses_api=True``) and pydantic-ai
(``OpenAIResponsesModel``). Each with its default settings: a streamed text answer, a multi-step
tool loop in which the client runs the tool, a multi-turn chat built from the client's own
returned history, and structured output that reaches the backend as ``response_format``. The
OpenAI Agents SDK for JavaScript has its own file (test_agents_js.py, using these checks).

The clients come from their registries (Makefile: npm for the AI SDK, the venv's dev extras for
the Python ones). The upstream answers by directives (demo_upstream.py): ``call: name {json}``
makes a tool call, a tool result is answered "The tool returned: …", ``json`` answers
``{"answer": …}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from pydantic import BaseModel

from helpers import (ROOT, WEATHER_CALL, assert_chat_history, assert_response_format, assert_tool_loop, openai_client,
                     responses_requests)

AI_SDK_VERSION = "6.0.325"


class Answer(BaseModel):
    answer: str


def weather(city: str) -> str:
    return f"sunny in {city}"


# --- the Vercel AI SDK (JavaScript) ------------------------------------------------------------


@pytest.fixture(scope="session")
def ai_sdk_dir() -> Path:
    path = Path(os.environ.get("AI_SDK_DIR") or ROOT / ".tools" / f"ai-sdk-{AI_SDK_VERSION}")
    if not (path / "node_modules" / "@ai-sdk" / "open-responses").is_dir() or not shutil.which("node"):
        pytest.fail("the Vercel AI SDK is not installed: run `make ai-sdk` (or set AI_SDK_DIR)")
    return path


def ai_sdk(ai_sdk_dir: Path, scenario: str, base_url: str, provider: str = "openai") -> dict:
    proc = subprocess.run(["node", str(ROOT / "tests" / "clients" / "ai_sdk.cjs"), scenario, base_url, provider],
                          env={**os.environ, "AI_SDK_DIR": str(ai_sdk_dir)}, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_ai_sdk_streams_text(ai_sdk_dir, gateway, upstream):
    upstream.clear()
    out = ai_sdk(ai_sdk_dir, "stream", gateway.base_url)
    assert out["text"] == "You said: hello from the ai sdk" == "".join(out["deltas"]) and len(out["deltas"]) > 1
    # @ai-sdk/openai reads only reasoning summaries; it asks for none by default (as against
    # OpenAI, which then shows no reasoning text): the reasoning is the item's content, not shown
    assert out["reasoning"] == ""


def test_ai_sdk_streams_a_reasoning_summary_when_it_asks_for_one(ai_sdk_dir, gateway, upstream):
    upstream.clear()
    out = ai_sdk(ai_sdk_dir, "summary", gateway.base_url)
    assert out["text"] == "You said: hello from the ai sdk"
    assert out["reasoning"] == "Thinking about: hello from the ai sdk"


def test_ai_sdk_tool_loop_with_item_references(ai_sdk_dir, recording_gateway, upstream):
    gw, flows = recording_gateway
    upstream.clear()
    out = ai_sdk(ai_sdk_dir, "tools", gw.base_url)
    assert out == {"ran": ["Paris"], "text": "The tool returned: sunny in Paris", "steps": 2}
    assert_tool_loop(upstream.requests())
    gw.stop()
    second = responses_requests(flows)[1]
    # store is on by default: the step's reasoning and call come back as references
    refs = [i for i in second["input"] if i.get("type") == "item_reference"]
    assert second.get("store", True) is not False and refs, second["input"]
    assert all(r["id"].startswith("rs_") for r in refs)  # the step's reasoning; the call is resent whole


def test_ai_sdk_chat_from_its_own_history_uses_item_references(ai_sdk_dir, recording_gateway, upstream):
    gw, flows = recording_gateway
    upstream.clear()
    out = ai_sdk(ai_sdk_dir, "chat", gw.base_url)
    assert out == {"first": "You said: my name is Ada", "second": "You said: what is my name", "reasoning": ""}
    assert_chat_history(upstream.requests())
    gw.stop()
    second = responses_requests(flows)[1]
    assert [i.get("type") for i in second["input"]] == [None, "item_reference", "item_reference", None], second


def test_ai_sdk_structured_output(ai_sdk_dir, gateway, upstream):
    upstream.clear()
    assert ai_sdk(ai_sdk_dir, "structured", gateway.base_url) == {"object": {"answer": "You said: json"}}
    assert_response_format(upstream.requests()[-1])


# --- @ai-sdk/open-responses: the AI SDK's provider for Open Responses servers ------------------


def test_open_responses_streams_text_and_reasoning(ai_sdk_dir, gateway, upstream):
    upstream.clear()
    out = ai_sdk(ai_sdk_dir, "stream", gateway.base_url, "open-responses")
    assert out["text"] == "You said: hello from the ai sdk" == "".join(out["deltas"]) and len(out["deltas"]) > 1
    assert out["reasoning"] == "Thinking about: hello from the ai sdk"  # (the reasoning item's content)
    assert upstream.requests()[-1]["messages"][-1] == {"role": "user", "content": "hello from the ai sdk"}


def test_open_responses_tool_loop(ai_sdk_dir, gateway, upstream):
    upstream.clear()
    out = ai_sdk(ai_sdk_dir, "tools", gateway.base_url, "open-responses")
    assert out == {"ran": ["Paris"], "text": "The tool returned: sunny in Paris", "steps": 2}
    assert_tool_loop(upstream.requests())


def test_open_responses_chat_from_its_own_history(ai_sdk_dir, recording_gateway, upstream):
    gw, flows = recording_gateway
    upstream.clear()
    out = ai_sdk(ai_sdk_dir, "chat", gw.base_url, "open-responses")
    # a JSON body: the reasoning read from the item's content (it reads no summary there)
    assert out == {"first": "You said: my name is Ada", "second": "You said: what is my name",
                   "reasoning": "Thinking about: my name is Ada"}
    gw.stop()
    second = responses_requests(flows)[1]
    # the whole history, as the provider keeps it (no store, no references, no reasoning items)
    assert [(i.get("type"), i.get("role")) for i in second["input"]] == [
        ("message", "user"), ("message", "assistant"), ("message", "user")], second["input"]
    messages = upstream.requests()[-1]["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "my name is Ada"), ("assistant", "You said: my name is Ada"), ("user", "what is my name")]


# --- the OpenAI Agents SDK (Python) -------------------------------------------------------------


@pytest.fixture
def agents_model(gateway):
    from agents import OpenAIResponsesModel, set_tracing_disabled

    set_tracing_disabled(True)  # traces would go to api.openai.com: nothing to do with the gateway
    return OpenAIResponsesModel(model="demo-model", openai_client=openai_client(gateway, api_key="unused",
                                                                                 asynchronous=True))


def test_agents_sdk_streams_text(agents_model, upstream):
    from agents import Agent, Runner
    from openai.types.responses import ResponseTextDeltaEvent

    async def run():
        result = Runner.run_streamed(Agent(name="a", instructions="Be brief.", model=agents_model), "hello agents")
        deltas = [e.data.delta async for e in result.stream_events()
                  if e.type == "raw_response_event" and isinstance(e.data, ResponseTextDeltaEvent)]
        return deltas, result.final_output

    deltas, final = asyncio.run(run())
    assert final == "".join(deltas) == "You said: hello agents" and len(deltas) > 1


def test_agents_sdk_tool_loop(agents_model, upstream):
    from agents import Agent, Runner, function_tool

    ran = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        ran.append(city)
        return weather(city)

    upstream.clear()
    agent = Agent(name="t", instructions="Use tools.", model=agents_model, tools=[get_weather])
    result = asyncio.run(Runner.run(agent, WEATHER_CALL))
    assert ran == ["Paris"] and result.final_output == "The tool returned: sunny in Paris"
    assert_tool_loop(upstream.requests())


def test_agents_sdk_chat_from_its_own_history(agents_model, upstream):
    from agents import Agent, Runner

    agent = Agent(name="a", instructions="Be brief.", model=agents_model)
    upstream.clear()

    async def run():
        first = await Runner.run(agent, "my name is Ada")
        return await Runner.run(agent, first.to_input_list() + [{"role": "user", "content": "what is my name"}])

    assert asyncio.run(run()).final_output == "You said: what is my name"
    assert_chat_history(upstream.requests())


def test_agents_sdk_structured_output(agents_model, upstream):
    from agents import Agent, Runner

    upstream.clear()
    agent = Agent(name="s", instructions="Answer in JSON.", model=agents_model, output_type=Answer)
    assert asyncio.run(Runner.run(agent, "answer as JSON\njson")).final_output == Answer(answer="You said: json")
    assert_response_format(upstream.requests()[-1])


# --- LangChain (langchain-openai) ---------------------------------------------------------------


@pytest.fixture
def chat_model(gateway):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model="demo-model", base_url=gateway.base_url, api_key="unused", use_responses_api=True,
                      max_retries=0)


def test_langchain_streams_text(chat_model):
    chunks = [c.text for c in chat_model.stream("hello langchain")]
    assert "".join(chunks) == "You said: hello langchain" and sum(1 for c in chunks if c) > 1


def test_langchain_tool_loop(chat_model, upstream):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return weather(city)

    upstream.clear()
    model = chat_model.bind_tools([get_weather])
    messages = [HumanMessage(WEATHER_CALL)]
    while (reply := model.invoke(messages)).tool_calls:  # the loop as LangChain's docs write it
        messages.append(reply)
        messages += [ToolMessage(get_weather.invoke(c["args"]), tool_call_id=c["id"]) for c in reply.tool_calls]
        assert len(messages) < 10
    assert reply.text == "The tool returned: sunny in Paris"
    assert_tool_loop(upstream.requests())


def test_langchain_chat_from_its_own_history(chat_model, upstream):
    from langchain_core.messages import HumanMessage

    upstream.clear()
    history = [HumanMessage("my name is Ada")]
    history += [chat_model.invoke(history), HumanMessage("what is my name")]
    assert chat_model.invoke(history).text == "You said: what is my name"
    assert_chat_history(upstream.requests())


def test_langchain_structured_output(chat_model, upstream):
    upstream.clear()
    assert chat_model.with_structured_output(Answer).invoke("answer as JSON\njson") == Answer(answer="You said: json")
    assert_response_format(upstream.requests()[-1])


# --- pydantic-ai ---------------------------------------------------------------------------------


@pytest.fixture
def pai_model(gateway):
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    return OpenAIResponsesModel("demo-model", provider=OpenAIProvider(base_url=gateway.base_url, api_key="unused"))


def test_pydantic_ai_streams_text(pai_model):
    from pydantic_ai import Agent

    async def run():
        async with Agent(pai_model).run_stream("hello pydantic") as result:
            return [d async for d in result.stream_text(delta=True, debounce_by=None)]

    deltas = asyncio.run(run())
    assert "".join(deltas) == "You said: hello pydantic" and len(deltas) > 1


def test_pydantic_ai_tool_loop(pai_model, upstream):
    from pydantic_ai import Agent

    ran = []
    agent = Agent(pai_model)

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """The weather in a city."""
        ran.append(city)
        return weather(city)

    upstream.clear()
    result = asyncio.run(agent.run(WEATHER_CALL))
    assert ran == ["Paris"] and result.output == "The tool returned: sunny in Paris"
    assert_tool_loop(upstream.requests())


def _second_turn_from_history(agent, upstream) -> None:
    """A pydantic-ai agent's two turns, the second sent with the first's messages as its history:
    answered, and the backend got that history (``assert_chat_history``)."""
    upstream.clear()

    async def run():
        first = await agent.run("my name is Ada")
        return await agent.run("what is my name", message_history=first.all_messages())

    assert asyncio.run(run()).output == "You said: what is my name"
    assert_chat_history(upstream.requests())


def test_pydantic_ai_chat_from_its_own_history(pai_model, upstream):
    from pydantic_ai import Agent

    # the reasoning came as the item's content (no summary asked for): pydantic-ai sends it back
    # as a reasoning item, which reaches the backend as the assistant message's reasoning field
    _second_turn_from_history(Agent(pai_model), upstream)


def test_pydantic_ai_stateless_reasoning_round_trip(recording_gateway, upstream):
    """Told the model does encrypted reasoning (its profile), with store off, pydantic-ai asks for
    the sealed reasoning and hands it back; the backend gets its own reasoning as the field."""
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIResponsesModel, OpenAIResponsesModelSettings
    from pydantic_ai.profiles.openai import OpenAIModelProfile
    from pydantic_ai.providers.openai import OpenAIProvider

    gw, flows = recording_gateway
    model = OpenAIResponsesModel("demo-model", provider=OpenAIProvider(base_url=gw.base_url, api_key="unused"),
                                 profile=OpenAIModelProfile(openai_supports_encrypted_reasoning_content=True))
    _second_turn_from_history(Agent(model, model_settings=OpenAIResponsesModelSettings(openai_store=False)), upstream)
    gw.stop()
    first, second = responses_requests(flows)
    assert first["include"] == ["reasoning.encrypted_content"] and second["store"] is False
    (reasoning,) = [i for i in second["input"] if i.get("type") == "reasoning"]
    assert reasoning["encrypted_content"].startswith("r2c1.")


def test_pydantic_ai_structured_output(pai_model, upstream):
    from pydantic_ai import Agent, NativeOutput

    upstream.clear()
    result = asyncio.run(Agent(pai_model, output_type=NativeOutput(Answer)).run("answer as JSON\njson"))
    assert result.output == Answer(answer="You said: json")
    assert_response_format(upstream.requests()[-1])


def test_open_responses_reads_how_a_turn_ended(ai_sdk_dir, gateway):
    """What the provider reads of a turn's end, streamed and whole: an incomplete response's
    ``incomplete_details.reason`` (its finish reason ``length``) and usage, a failed one's
    ``error.code`` (finish reason ``error``), and a refused request's status. (Its error schema
    requires ``param`` as a string, so of the gateway's JSON error, OpenAI's envelope with
    ``"param": null``, it shows only the HTTP status text.)"""
    out = ai_sdk(ai_sdk_dir, "endings", gateway.base_url, "open-responses")
    length = out["length"]
    assert length["stream"]["finish"] == length["whole"]["finish"] == "length"
    assert length["stream"]["raw"] == length["whole"]["raw"] == "max_output_tokens"
    assert length["whole"]["text"] == "You said: length"
    inp, outp, reasoning = length["stream"]["tokens"]
    assert inp > 0 and outp > reasoning > 0 and length["whole"]["tokens"] == [inp, outp]
    assert out["failed"]["stream"]["finish"] == "error" and out["failed"]["stream"]["raw"] == "server_error"
    assert out["refused"]["stream"]["finish"] == "error" and out["refused"]["stream"]["raw"] == "invalid_prompt"
    assert out["refused"]["whole"]["status"] == 400 and "Bad Gateway" in out["failed"]["whole"]["error"]
