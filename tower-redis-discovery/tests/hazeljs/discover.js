'use strict';
// Looks a service up through HazelJS's DiscoveryClient on its Redis backend and prints, as one JSON line:
//
//   { "instances": [ { "seen": <the instance as getInstances returned it>, "types": { field: type },
//                      "raw": <the stored JSON string>, "rawDates": { field: { "iso": bool } } } ],
//     "chosen": <getInstance(name, strategy, filter)'s pick, or null>,
//     "response": { "status": 200, "body": "..." } }            (with --request PATH)
//
//   node discover.js --redis URL --name SERVICE [--prefix P] [--strategy round-robin] [--filter '{"zone":"z"}']
//                    [--request /path]
//
// --request calls the chosen instance the way HazelJS's ServiceClient does (axios, baseURL
// `${protocol}://${host}:${port}`); ServiceClient itself cannot be loaded because it requires
// `@hazeljs/resilience`, which is not published.
const axios = require('axios');
const { DiscoveryClient } = require('@hazeljs/discovery/dist/client/discovery-client');
const { options, backend, fail } = require('./common');

/** The type of each field as HazelJS hands it to callers: `date` for a valid Date, `invalid-date` otherwise. */
function types(instance) {
  const out = {};
  for (const [key, value] of Object.entries(instance)) {
    if (value instanceof Date) out[key] = Number.isNaN(value.getTime()) ? 'invalid-date' : 'date';
    else if (Array.isArray(value)) out[key] = value.every((v) => typeof v === 'string') ? 'string[]' : 'array';
    else if (value === null) out[key] = 'null';
    else out[key] = typeof value;
  }
  return out;
}

/** Whether each stored timestamp is exactly what `Date.toISOString()` writes for it. */
function rawDates(parsed) {
  const out = {};
  for (const key of ['lastHeartbeat', 'registeredAt']) {
    const text = parsed[key];
    const date = new Date(text);
    out[key] = { iso: typeof text === 'string' && !Number.isNaN(date.getTime()) && date.toISOString() === text };
  }
  return out;
}

async function main() {
  const opts = options({
    redis: process.env.REDIS_URL || '',
    prefix: process.env.HAZELJS_PREFIX || '',
    name: '',
    strategy: 'round-robin',
    filter: '',
    request: '',
  });
  if (!opts.redis || !opts.name) throw new Error('--redis and --name are required');
  const { redis, backend: registryBackend } = backend(opts.redis, opts.prefix, '');
  const client = new DiscoveryClient({ cacheEnabled: false }, registryBackend);
  const filter = opts.filter ? JSON.parse(opts.filter) : undefined;

  const found = await client.getInstances(opts.name, filter);
  const instances = [];
  for (const seen of found) {
    const raw = await redis.get(`${opts.prefix || 'hazeljs:discovery:'}instance:${seen.id}`);
    instances.push({ seen, types: types(seen), raw, rawDates: raw ? rawDates(JSON.parse(raw)) : null });
  }
  const chosen = await client.getInstance(opts.name, opts.strategy, filter);
  const result = { instances, chosen };

  if (opts.request) {
    if (!chosen) throw new Error(`No instances available for service: ${opts.name}`);
    const http = axios.create({ timeout: 5000 });
    const baseURL = `${chosen.protocol}://${chosen.host}:${chosen.port}`;
    const response = await http.request({
      method: 'GET',
      url: opts.request,
      baseURL,
      responseType: 'text',
      transformResponse: (body) => body,
    });
    result.response = { status: response.status, body: response.data };
  }

  client.close();
  await redis.quit();
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

main().catch(fail);
