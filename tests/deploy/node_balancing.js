#!/usr/bin/env node
// Node (@grpc/grpc-js) with the service config of docs/deploy.md: makes CALLS Generate calls,
// CONCURRENCY at a time, and prints {"served": {model_id: count}, "failures": [...]}.
// Usage: NODE_PATH=examples/node/node_modules node node_balancing.js TARGET CALLS CONFIG_JSON
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [target, calls, serviceConfig] = process.argv.slice(2);
const definition = protoLoader.loadSync('peftserve/v1/generation.proto', {
  includeDirs: [path.resolve(__dirname, '..', '..', 'protos')],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: false,
  oneofs: true,
});
const Service = grpc.loadPackageDefinition(definition).peftserve.v1.GenerationService;
const client = new Service(target, grpc.credentials.createInsecure(), {
  'grpc.service_config': serviceConfig,
});

function generate(i) {
  return new Promise((resolve) => {
    const deadline = new Date(Date.now() + 10000);
    client.Generate({ text: `p${i}` }, { deadline }, (error, response) => {
      resolve(error ? { error: `${error.code}: ${error.details}` } : response);
    });
  });
}

async function main() {
  const served = {};
  const failures = [];
  for (let i = 0; i < Number(calls); i += 1) {
    const result = await generate(i);
    if (result.error) failures.push(result.error);
    else served[result.provenance.model_id] = (served[result.provenance.model_id] || 0) + 1;
  }
  client.close();
  console.log(JSON.stringify({ served, failures }));
}

main();
