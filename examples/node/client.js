#!/usr/bin/env node
// A peftserve client built from the .proto alone: no generated code, no Python.
//
// Usage: node client.js TARGET PROMPT [ADAPTER] [MAX_NEW_TOKENS]
// Calls Generate, then StreamGenerate with the same request, then Generate once more with a
// JSON-schema constraint (the output must be an object {"animal": ..., "legs": ...}), and
// prints one JSON object:
//   {"generate": {...GenerateResponse...}, "stream": {"text": ..., "deltas": N, "summary": {...}},
//    "constrained": {"value": {...parsed output...}, "sequence": {...Sequence...}}}
// Errors print {"error": {"code": ..., "name": ..., "details": ...}} and exit 1.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');

function loadService() {
  const definition = protoLoader.loadSync('peftserve/v1/generation.proto', {
    includeDirs: [PROTO_ROOT],
    // Field names exactly as in the contract; 64-bit seeds as strings (no precision loss);
    // enums by name; unset fields stay absent so "unset" and "zero" remain distinct.
    keepCase: true,
    longs: String,
    enums: String,
    defaults: false,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).peftserve.v1.GenerationService;
}

function errorJson(error) {
  const name = Object.keys(grpc.status).find((key) => grpc.status[key] === error.code);
  return { error: { code: error.code, name, details: error.details } };
}

// The constraint of the third call: a JSON Schema, sent as text.
const ANIMAL_SCHEMA = JSON.stringify({
  type: 'object',
  properties: {
    animal: { enum: ['fox', 'dog', 'cat'] },
    legs: { type: 'integer', minimum: 0, maximum: 8 },
  },
  required: ['animal', 'legs'],
  additionalProperties: false,
});

function deadline(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

// Ray Serve routes a call to a replica that already holds its adapter when the call carries
// the adapter as `multiplexed_model_id` metadata (docs/deploy.md); a plain server ignores it.
function routing(adapter) {
  const metadata = new grpc.Metadata();
  if (adapter) metadata.set('multiplexed_model_id', adapter);
  return metadata;
}

function generate(client, request) {
  return new Promise((resolve, reject) => {
    const metadata = routing(request.adapter);
    client.Generate(request, metadata, { deadline: deadline(60) }, (error, response) => {
      if (error) reject(error);
      else resolve(response);
    });
  });
}

function streamGenerate(client, request) {
  return new Promise((resolve, reject) => {
    const texts = new Map();
    let deltas = 0;
    let summary = null;
    const call = client.StreamGenerate(request, routing(request.adapter), {
      deadline: deadline(60),
    });
    call.on('data', (message) => {
      if (message.event === 'delta') {
        deltas += 1;
        const { index = 0, text = '' } = message.delta;
        texts.set(index, (texts.get(index) || '') + text);
      } else if (message.event === 'summary') {
        summary = message.summary;
      }
    });
    call.on('error', reject);
    call.on('end', () => resolve({ text: texts.get(0) || '', deltas, summary }));
  });
}

async function main(argv) {
  if (argv.length < 2) {
    process.stderr.write('usage: client.js TARGET PROMPT [ADAPTER] [MAX_NEW_TOKENS]\n');
    return 2;
  }
  const [target, prompt, adapter = '', maxNewTokens = '32'] = argv;
  const Service = loadService();
  const client = new Service(target, grpc.credentials.createInsecure());
  const request = {
    text: prompt,
    adapter,
    parameters: { max_new_tokens: Number(maxNewTokens) },
  };
  try {
    const result = {
      generate: await generate(client, request),
      stream: await streamGenerate(client, request),
    };
    const constrained = await generate(client, {
      ...request,
      parameters: { max_new_tokens: 64 },
      constraint: { json_schema: ANIMAL_SCHEMA },
    });
    const sequence = constrained.sequences[0];
    result.constrained = { value: JSON.parse(sequence.text), sequence };
    process.stdout.write(JSON.stringify(result) + '\n');
    return 0;
  } catch (error) {
    process.stdout.write(JSON.stringify(errorJson(error)) + '\n');
    return 1;
  } finally {
    client.close();
  }
}

main(process.argv.slice(2)).then((code) => {
  process.exitCode = code;
});
