// A Node client of the textgen server: @grpc/grpc-js with the .proto files loaded at run
// time by @grpc/proto-loader (pinned in the repo's package.json, installed by `npm ci`).
// Usage: node call_server.js HOST:PORT PROMPT MAX_NEW_TOKENS
// Prints one JSON line: the unary response, the stream's messages, and the status code
// of a request with an invalid temperature.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [target, prompt, maxNewTokens] = process.argv.slice(2);
const definition = protoLoader.loadSync("textgen/v1/text_generation_service.proto", {
  includeDirs: [path.resolve(__dirname, "../../../protos")],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const textgen = grpc.loadPackageDefinition(definition).textgen.v1;
const client = new textgen.TextGenerationService(target, grpc.credentials.createInsecure());
const deadline = () => ({ deadline: Date.now() + 120000 });
const request = { text: prompt, config: { max_new_tokens: Number(maxNewTokens) } };

function unary(req) {
  return new Promise((resolve, reject) =>
    client.Generate(req, deadline(), (err, response) => (err ? reject(err) : resolve(response))),
  );
}

function stream(req) {
  return new Promise((resolve, reject) => {
    const messages = [];
    const call = client.GenerateStream(req, deadline());
    call.on("data", (message) => messages.push(message));
    call.on("error", reject);
    call.on("end", () => resolve(messages));
  });
}

async function main() {
  const result = { unary: await unary(request), stream: await stream(request) };
  const bad = { text: prompt, config: { do_sample: true, temperature: 0 } };
  result.invalid_code = await unary(bad).then(() => 0, (err) => err.code);
  console.log(JSON.stringify(result));
  client.close();
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
