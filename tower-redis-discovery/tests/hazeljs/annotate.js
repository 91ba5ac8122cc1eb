'use strict';
// Adds an unknown field to a stored instance the way HazelJS rewrites entries (GET, JSON.parse, JSON.stringify,
// SETEX with the backend's TTL), then runs HazelJS's own `backend.heartbeat(id)` on it, and prints the stored JSON.
//
//   node annotate.js --redis URL --id INSTANCE_ID --field NAME --value '<json>' [--prefix P] [--ttl 90]
const { options, backend, fail } = require('./common');

async function main() {
  const opts = options({
    redis: process.env.REDIS_URL || '',
    prefix: process.env.HAZELJS_PREFIX || '',
    id: '',
    field: '',
    value: '',
    ttl: '90',
  });
  if (!opts.redis || !opts.id || !opts.field) throw new Error('--redis, --id and --field are required');
  const { redis, backend: registryBackend } = backend(opts.redis, opts.prefix, opts.ttl);
  const key = `${opts.prefix || 'hazeljs:discovery:'}instance:${opts.id}`;
  const stored = await redis.get(key);
  if (!stored) throw new Error(`no entry at ${key}`);
  const instance = JSON.parse(stored);
  instance[opts.field] = JSON.parse(opts.value);
  await redis.setex(key, Number(opts.ttl), JSON.stringify(instance));
  await registryBackend.heartbeat(opts.id);
  const after = await redis.get(key);
  await redis.quit();
  process.stdout.write(`${after}\n`);
}

main().catch(fail);
