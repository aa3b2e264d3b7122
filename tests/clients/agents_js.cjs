// The OpenAI Agents SDK for JavaScript (`@openai/agents`) against a resp2chat gateway, set up as
// its docs say for another OpenAI-compatible server: the default OpenAI client pointed at the
// gateway, tracing off (traces would go to OpenAI's platform), the Responses API (its default).
// Run by tests/test_agents_js.py:
//   node agents_js.cjs <scenario> <base_url> [transport]   (AGENTS_JS_DIR: the npm folder holding node_modules;
//                                                           transport: http, the default, or websocket)
// Prints one JSON object on stdout.
const path = require("node:path");
const { createRequire } = require("node:module");

const need = createRequire(path.join(process.env.AGENTS_JS_DIR, "package.json"));
const { OpenAI } = need("openai");
const {
  Agent, run, tool, hostedMcpTool, OpenAIConversationsSession, OpenAIResponsesCompactionSession, setDefaultOpenAIClient, setOpenAIResponsesTransport, setTracingDisabled,
} = need("@openai/agents");
const { z } = need("zod");

const [scenario, baseURL, transport = "http", prompt] = process.argv.slice(2);
setDefaultOpenAIClient(new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0 }));
setOpenAIResponsesTransport(transport);
setTracingDisabled(true);

const CALL = 'call: get_weather {"city": "Paris"}';
const ran = [];
const getWeather = tool({
  name: "get_weather",
  description: "The weather in a city",
  parameters: z.object({ city: z.string() }),
  execute: async ({ city }) => {
    ran.push(city);
    return `sunny in ${city}`;
  },
});
const agent = (extra = {}) => new Agent({ name: "assistant", instructions: "Be brief.", model: "demo-model", ...extra });

// a streamed run: the text deltas as they arrive (the raw Responses events the SDK passes on,
// and its own text stream), then the final output
async function streamed(a, input, options = {}) {
  const result = await run(a, input, { stream: true, ...options });
  const deltas = [];
  const kinds = [];
  for await (const event of result) {
    if (event.type === "raw_model_stream_event") {
      kinds.push(event.data.type);
      if (event.data.type === "output_text_delta") deltas.push(event.data.delta);
    }
  }
  await result.completed;
  return { result, deltas, kinds };
}

const items = (result) => result.newItems.map((i) => i.type);

const scenarios = {
  async stream() {
    const { result, deltas, kinds } = await streamed(agent(), prompt || "hello agents js");
    return { deltas, final: result.finalOutput, responseId: result.lastResponseId, kinds: [...new Set(kinds)] };
  },

  async text_stream() {
    const result = await run(agent(), "hello text stream", { stream: true });
    const chunks = [];
    for await (const chunk of result.toTextStream()) chunks.push(chunk);
    await result.completed;
    return { chunks, final: result.finalOutput };
  },

  async run() {
    const result = await run(agent(), "hello agents js");
    const [raw] = result.rawResponses;
    return { final: result.finalOutput, responseId: result.lastResponseId, items: items(result), usage: raw.usage };
  },

  async tools() {
    const result = await run(agent({ tools: [getWeather] }), CALL);
    return { ran, final: result.finalOutput, items: items(result), responses: result.rawResponses.length };
  },

  async tools_stream() {
    const { result, deltas } = await streamed(agent({ tools: [getWeather] }), CALL);
    return { ran, final: result.finalOutput, deltas, items: items(result) };
  },

  // multi-turn from the SDK's own history: the first run's history plus a new user message
  async chat() {
    const a = agent();
    const first = await run(a, "my name is Ada");
    const second = await run(a, [...first.history, { role: "user", content: "what is my name" }]);
    return { first: first.finalOutput, second: second.finalOutput };
  },

  // multi-turn by reference: the gateway keeps the conversation (store), the SDK sends the new
  // message and the previous response's id
  async previous_response() {
    const a = agent();
    const first = await run(a, "my name is Ada");
    const second = await run(a, "what is my name", { previousResponseId: first.lastResponseId });
    return { first: first.finalOutput, second: second.finalOutput, firstId: first.lastResponseId };
  },

  // a tool loop continued by reference, streamed: each step sends only the tool's output
  async previous_response_tools() {
    const first = await run(agent(), "my name is Ada");
    const { result } = await streamed(agent({ tools: [getWeather] }), CALL, { previousResponseId: first.lastResponseId });
    return { ran, final: result.finalOutput, items: items(result) };
  },

  // multi-turn kept in the gateway's Conversations API by the SDK's session
  async session() {
    const a = agent();
    const session = new OpenAIConversationsSession();
    const first = await run(a, "my name is Ada", { session });
    const second = await run(a, "what is my name", { session });
    const kept = await session.getItems();
    return { first: first.finalOutput, second: second.finalOutput, conversation: await session.getSessionId(),
             kept: kept.map((i) => i.role ?? i.type) };
  },

  // a session compacted by the gateway's POST /v1/responses/compact after every turn (the SDK
  // takes only an OpenAI-like model name for it: prompt)
  async compaction() {
    const a = agent();
    const session = new OpenAIResponsesCompactionSession({ model: prompt, shouldTriggerCompaction: () => true });
    const first = await run(a, "my name is Ada", { session });
    const second = await run(a, "what is my name", { session });
    const kept = await session.getItems();
    return { first: first.finalOutput, second: second.finalOutput, kept: kept.map((i) => i.role ?? i.type) };
  },

  async reasoning() {
    const result = await run(agent({ modelSettings: { reasoning: { summary: "auto" } } }), "hello agents js");
    return { final: result.finalOutput, reasoning: result.newItems.filter((i) => i.type === "reasoning_item")
      .map((i) => i.rawItem.content.map((c) => c.text)) };
  },

  async structured() {
    const result = await run(agent({ outputType: z.object({ answer: z.string() }) }), "answer as JSON\njson");
    return { final: result.finalOutput };
  },

  async structured_stream() {
    const { result } = await streamed(agent({ outputType: z.object({ answer: z.string() }) }), "answer as JSON\njson");
    return { final: result.finalOutput };
  },

  // a turn the backend fails (the prompt says how), streamed or not: what the SDK raises
  async failure() {
    const out = {};
    for (const stream of [true, false]) {
      try {
        const result = await run(agent(), prompt, { stream });
        if (stream) for await (const _ of result);
        await result.completed;
        out[stream ? "stream" : "run"] = { final: result.finalOutput };
      } catch (err) {
        out[stream ? "stream" : "run"] = { error: err.constructor.name, message: err.message };
      }
    }
    return out;
  },

  // a hosted MCP tool: the gateway lists and calls the server's tools (server "ev" of its mcp_servers)
  async mcp() {
    const mcp = hostedMcpTool({ serverLabel: "ev", requireApproval: "never" });
    const result = await run(agent({ tools: [mcp] }), 'call: mcp__ev__echo {"message": "hello mcp"}');
    return { final: result.finalOutput, items: items(result), output: result.rawResponses.at(-1).output };
  },

  // ... with approvals: the turn ends with an approval request; the SDK's onApproval answers it
  // and sends the answer in the next turn (by previous_response_id)
  async mcp_approval() {
    const asked = [];
    const mcp = hostedMcpTool({
      serverLabel: "ev",
      requireApproval: "always",
      onApproval: async (_context, item) => {
        asked.push(item.rawItem.name);
        return { approve: true };
      },
    });
    const result = await run(agent({ tools: [mcp] }), 'call: mcp__ev__echo {"message": "hello mcp"}');
    return { asked, final: result.finalOutput, items: items(result), responses: result.rawResponses.length };
  },
};

scenarios[scenario]()
  .then((out) => process.stdout.write(JSON.stringify(out) + "\n"))
  .catch((err) => {
    process.stderr.write(String((err && err.stack) || err) + "\n");
    if (err && err.error) process.stderr.write("error body: " + JSON.stringify(err.error) + "\n");
    process.exit(1);
  });
