'use strict';
// Registers an HTTP service through HazelJS's ServiceRegistry on its Redis backend, serves it, and heartbeats
// (HazelJS's own self health check every --interval ms) until killed.
//
//   node register.js --redis redis://127.0.0.1:6379 --name hazel-api [--port 0] [--prefix hazeljs:discovery:]
//                    [--ttl 90] [--interval 30000] [--zone z] [--tags a,b] [--metadata '{"k":"v"}']
//
// Every path but /health answers `hazel:{name}:{port}`. Prints one line `READY {"id":...,"port":...}` once
// registered (HazelJS has run its first health check, so the status is UP), then nothing more on stdout. SIGTERM
// and SIGINT deregister first; SIGKILL leaves the entry to expire, as a crash would.
const http = require('node:http');
const { ServiceRegistry } = require('@hazeljs/discovery/dist/registry/service-registry');
const { options, backend, fail } = require('./common');

async function main() {
  const opts = options({
    redis: process.env.REDIS_URL || '',
    prefix: process.env.HAZELJS_PREFIX || '',
    name: 'hazel-api',
    host: '127.0.0.1',
    port: process.env.PORT || '0',
    ttl: '',
    interval: '',
    zone: '',
    tags: '',
    metadata: '',
  });
  if (!opts.redis) throw new Error('--redis (or REDIS_URL) is required');

  const server = http.createServer((req, res) => {
    if (req.url === '/health') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end('{"status":"ok"}');
      return;
    }
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.end(`hazel:${opts.name}:${server.address().port}`);
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(Number(opts.port), opts.host, resolve);
  });
  const port = server.address().port;

  const { redis, backend: registryBackend } = backend(opts.redis, opts.prefix, opts.ttl);
  const config = { name: opts.name, host: opts.host, port };
  if (opts.interval) config.healthCheckInterval = Number(opts.interval);
  if (opts.zone) config.zone = opts.zone;
  if (opts.tags) config.tags = opts.tags.split(',');
  if (opts.metadata) config.metadata = JSON.parse(opts.metadata);
  const registry = new ServiceRegistry(config, registryBackend);
  await registry.register();

  const instance = registry.getInstance();
  if (!instance || instance.status !== 'UP') {
    throw new Error(`registered, but HazelJS's self check left the status at ${instance && instance.status}`);
  }
  process.stdout.write(`READY ${JSON.stringify({ id: instance.id, port })}\n`);

  const stop = async () => {
    try {
      await registry.deregister();
      await redis.quit();
    } finally {
      server.close();
      process.exit(0);
    }
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch(fail);
