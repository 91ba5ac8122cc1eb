'use strict';
// Shared by the interop scripts. The package's main entry cannot load (`require("@hazeljs/discovery")` needs
// `@hazeljs/resilience`, which is not on the npm registry), so everything is deep-required from its dist/.
const { parseArgs } = require('node:util');
const Redis = require('ioredis');
const { RedisRegistryBackend } = require('@hazeljs/discovery/dist/backends/redis-backend');
const { DiscoveryLogger } = require('@hazeljs/discovery/dist/utils/logger');

// HazelJS logs through console.info (stdout); keep stdout for our protocol lines only.
const toStderr = (level) => (msg, ...args) => console.error(`[hazeljs ${level}] ${msg}`, ...args);
DiscoveryLogger.setLogger({
  debug: () => {},
  info: toStderr('info'),
  warn: toStderr('warn'),
  error: toStderr('error'),
});

/** Parses `--name value` options; `spec` maps option names to their defaults (strings or booleans). */
function options(spec) {
  const config = {};
  for (const [name, fallback] of Object.entries(spec)) {
    config[name] = { type: typeof fallback === 'boolean' ? 'boolean' : 'string' };
  }
  const { values } = parseArgs({ options: config, strict: true });
  const out = {};
  for (const [name, fallback] of Object.entries(spec)) {
    out[name] = values[name] === undefined ? fallback : values[name];
  }
  return out;
}

/** An ioredis client and HazelJS's Redis backend on it. `prefix` empty means HazelJS's default. */
function backend(url, prefix, ttlSeconds) {
  const redis = new Redis(url, { maxRetriesPerRequest: 2, connectTimeout: 2000 });
  const config = {};
  if (prefix) config.keyPrefix = prefix;
  if (ttlSeconds) config.ttl = Number(ttlSeconds);
  return { redis, backend: new RedisRegistryBackend(redis, config) };
}

function fail(error) {
  console.error(error && error.stack ? error.stack : error);
  process.exit(1);
}

module.exports = { options, backend, fail };
