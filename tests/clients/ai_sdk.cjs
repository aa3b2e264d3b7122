// The Vercel AI SDK (`ai`) against a resp2chat gateway, default settings, through one of its two
// Responses providers:
// - `openai` (`@ai-sdk/openai`): speaks the Responses API and keeps `store` on, so earlier
//   assistant messages and reasoning go back as item_reference;
// - `open-responses` (`@ai-sdk/open-responses`, for Open Responses servers): sends the whole
//   history each time, reads reasoning as a summary or as content.
// Run by tests/test_client_libraries.py:
//   node ai_sdk.cjs <scenario> <base_url> [openai|open-responses]   (AI_SDK_DIR: the npm folder holding node_modules)
// Prints one JSON object on stdout.
const path = require("node:path");
const { createRequire } = require("node:module");

const need = createRequire(path.join(process.env.AI_SDK_DIR, "package.json"));
const { streamText, generateText, Output, tool, stepCountIs } = need("ai");
const { z } = need("zod");

const [scenario, baseURL, provider = "openai"] = process.argv.slice(2);
const providers = {
  openai: () => need("@ai-sdk/openai").createOpenAI({ baseURL, apiKey: "unused" })("demo-model"), // the Responses API: its default
  "open-responses": () =>
    need("@ai-sdk/open-responses").createOpenResponses({ name: "gateway", url: `${baseURL}/responses`, apiKey: "unused" })(
      "demo-model",
    ),
};
const model = providers[provider]();

const scenarios = {
  async stream() {
    const result = streamText({ model, prompt: "hello from the ai sdk" });
    const deltas = [];
    for await (const delta of result.textStream) deltas.push(delta);
    return { deltas, text: await result.text, reasoning: await result.reasoningText };
  },

  // asking for a reasoning summary: the provider sends reasoning.summary only to a model it
  // takes for a reasoning model (forceReasoning tells it this one is)
  async summary() {
    const result = streamText({
      model,
      prompt: "hello from the ai sdk",
      providerOptions: { openai: { forceReasoning: true, reasoningSummary: "auto" } },
    });
    for await (const _ of result.textStream);
    return { text: await result.text, reasoning: await result.reasoningText };
  },

  async tools() {
    const ran = [];
    const result = await generateText({
      model,
      prompt: 'call: get_weather {"city": "Paris"}',
      tools: {
        get_weather: tool({
          description: "The weather in a city",
          inputSchema: z.object({ city: z.string() }),
          execute: async ({ city }) => {
            ran.push(city);
            return `sunny in ${city}`;
          },
        }),
      },
      stopWhen: stepCountIs(5),
    });
    return { ran, text: result.text, steps: result.steps.length };
  },

  async chat() {
    const messages = [{ role: "user", content: "my name is Ada" }];
    const first = await generateText({ model, messages });
    messages.push(...first.response.messages);
    messages.push({ role: "user", content: "what is my name" });
    const second = await generateText({ model, messages });
    return { first: first.text, second: second.text, reasoning: first.reasoningText ?? "" };
  },

  // how a turn ended, as the provider reads it: the finish reason (incomplete_details.reason;
  // a failed response's error code), the usage, and a JSON error body's message
  async endings() {
    const ended = async (prompt) => {
      const streamed = streamText({ model, prompt, onError: () => {} });
      for await (const _ of streamed.fullStream);
      const out = { stream: { finish: await streamed.finishReason, raw: await streamed.rawFinishReason } };
      const usage = await streamed.usage;
      out.stream.tokens = [usage.inputTokens, usage.outputTokens, usage.outputTokenDetails?.reasoningTokens];
      try {
        const whole = await generateText({ model, prompt });
        out.whole = { finish: whole.finishReason, raw: whole.rawFinishReason, text: whole.text,
                      tokens: [whole.usage.inputTokens, whole.usage.outputTokens] };
      } catch (err) {
        out.whole = { error: err.message, status: err.statusCode };
      }
      return out;
    };
    return { length: await ended("length"), failed: await ended("midstream-error"), refused: await ended("error: 400 no") };
  },

  async structured() {
    const result = await generateText({
      model,
      prompt: "answer as JSON\njson",
      output: Output.object({ schema: z.object({ answer: z.string() }) }),
    });
    return { object: result.output };
  },
};

scenarios[scenario]()
  .then((out) => process.stdout.write(JSON.stringify(out) + "\n"))
  .catch((err) => {
    process.stderr.write(String((err && err.stack) || err) + "\n");
    if (err && err.responseBody) process.stderr.write("response body: " + err.responseBody + "\n");
    process.exit(1);
  });
