// Follows one channel with the official centrifuge SDK and prints every event as a
// JSON line on stdout (the Rust test reads them): subscribed (recovered,
// wasRecovering), pub (data, offset), connecting, connected, error.
// Usage: node follow.mjs ws://127.0.0.1:PORT/connection/websocket CHANNEL [TOKEN]
import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';

const [url, channel, token] = process.argv.slice(2);
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');
const c = new Centrifuge(url, {
  websocket: WebSocket,
  token: token || undefined,
  minReconnectDelay: 100,
  maxReconnectDelay: 400,
});
c.on('connecting', (ctx) => out({ event: 'connecting', code: ctx.code }));
c.on('connected', () => out({ event: 'connected' }));
c.on('disconnected', (ctx) => out({ event: 'disconnected', code: ctx.code, reason: ctx.reason }));
c.on('error', (ctx) => out({ event: 'error', message: String(ctx.error && ctx.error.message) }));
const sub = c.newSubscription(channel, { recoverable: true, positioned: true });
sub.on('subscribed', (ctx) => out({
  event: 'subscribed', recovered: ctx.recovered, wasRecovering: ctx.wasRecovering,
  offset: ctx.streamPosition ? ctx.streamPosition.offset : null,
}));
sub.on('subscribing', (ctx) => out({ event: 'subscribing', code: ctx.code }));
sub.on('error', (ctx) => out({ event: 'suberror', message: String(ctx.error && ctx.error.message) }));
sub.on('publication', (ctx) => out({ event: 'pub', data: ctx.data, offset: ctx.offset }));
sub.subscribe();
c.connect();
// Publish what arrives on stdin (one JSON value per line), then exit when it closes.
let buf = '';
process.stdin.on('data', (d) => {
  buf += d;
  let i;
  while ((i = buf.indexOf('\n')) >= 0) {
    const line = buf.slice(0, i);
    buf = buf.slice(i + 1);
    if (line.trim()) {
      c.publish(channel, JSON.parse(line)).then(
        () => out({ event: 'published' }),
        (e) => out({ event: 'publisherror', message: String(e && e.message) }));
    }
  }
});
process.stdin.on('end', () => { c.disconnect(); process.exit(0); });
setTimeout(() => process.exit(2), 120000).unref();
