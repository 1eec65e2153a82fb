// Real Node clients against the gateway: the openai SDK (Responses, embeddings, legacy completions)
// and the Vercel AI SDK (generateText / streamText with `openai("m")`, i.e. the Responses API).
// Usage: node clients.mjs <gateway base URL, e.g. http://127.0.0.1:port/openai/v1> <gateway key>
// Prints one JSON object with what each client got; tests/test_clients_openai.py checks it.
import OpenAI from "openai";
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, streamText } from "ai";

const [baseURL, apiKey] = process.argv.slice(2);
const out = {};
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 20000 });

const r = await client.responses.create({ model: "gpt-4o", input: "hi" });
out.responses = { text: r.output_text, input_tokens: r.usage?.input_tokens };

const stream = await client.responses.create({ model: "gpt-4o", input: "hi", stream: true });
let streamed = "";
let completed = null;
for await (const ev of stream) {
  if (ev.type === "response.output_text.delta") streamed += ev.delta;
  if (ev.type === "response.completed") completed = ev.response.usage;
}
out.responses_stream = { text: streamed, output_tokens: completed?.output_tokens };

const e = await client.embeddings.create({ model: "text-embedding-3-small", input: ["a", "b"] });
out.embeddings = { n: e.data.length, dim: e.data[0].embedding.length, first: e.data[0].embedding[0] };

const c = await client.completions.create({ model: "gpt-4o", prompt: "say", max_tokens: 5 });
out.completions = { text: c.choices[0].text, total: c.usage?.total_tokens };

const openai = createOpenAI({ baseURL, apiKey });
const g = await generateText({ model: openai("gpt-4o"), prompt: "hi", maxRetries: 0 });
out.vercel_generate = { text: g.text, input: g.usage.inputTokens, output: g.usage.outputTokens };

const s = streamText({ model: openai("gpt-4o"), prompt: "hi", maxRetries: 0 });
let vtext = "";
for await (const part of s.textStream) vtext += part;
const su = await s.usage;
out.vercel_stream = { text: vtext, input: su.inputTokens, output: su.outputTokens };

console.log(JSON.stringify(out));
