// How an application uses @ferrocast/client, typed against clients/js/ferrocast.d.ts.
// types.test.mjs compiles this with `tsc --noEmit`: every line must type-check, and every
// `@ts-expect-error` line must be refused (a declaration grown too loose fails the check).

import {
  Ferrocast,
  FerrocastError,
  STATES,
  TERMINAL_CLOSE_CODES,
  TOKEN_EXPIRED_CLOSE_CODE,
  backoffDelay,
  qualityScore,
  type ClientStats,
  type FerrocastOptions,
  type MessageMeta,
  type State,
  type SubscriptionInfo,
} from '../../../clients/js/ferrocast.js';

interface Tick {
  price: number;
  size: number;
}

const options: FerrocastOptions = {
  url: 'https://push.example.com',
  transports: ['websocket', 'sse'],
  getToken: async () => 'a.jwt.token',
  backoff: { baseMs: 250 },
  logger: console,
  autoConnect: false,
};
const client = new Ferrocast(options);

const stop: () => void = client.subscribe<Tick>('ticks.BTCUSD', (tick, meta: MessageMeta) => {
  const notional: number = tick.price * tick.size;
  const offset: number | null = meta.offset;
  console.log(notional, offset, meta.channel, meta.ephemeral, meta.epoch);
});
stop();

client.on('state', (state: State, detail) => console.log(state, detail));
client.on('connected', ({ transport, session }) => console.log(transport.toUpperCase(), session));
client.on('reconnecting', ({ attempt, delayMs, code }) => console.log(attempt + delayMs, code));
client.on('gap', (gap) => {
  const why: 'offset' | 'not_recovered' | 'epoch' = gap.reason;
  console.log(why, gap.expected, gap.received);
});
client.on('subscribed', (ack) => console.log(ack.recovered, ack.snapshot?.kind));
client.on('error', (e) => console.log(e.code, e.channels.join(',')));
const off = client.on('latency', (l) => console.log(l.srtt, l.quality));
off();

async function publishOne(): Promise<void> {
  const reply: Record<string, unknown> = await client.publish('chat.room1', { text: 'hi' });
  console.log(reply);
}
void publishOne;

const info: SubscriptionInfo | null = client.subscription('ticks.BTCUSD');
const stats: ClientStats = client.stats();
console.log(info?.listeners, stats.reconnects, stats.state, client.state, client.quality);
console.log(STATES.includes('connected'), TERMINAL_CLOSE_CODES[0]);
const expired: 4011 = TOKEN_EXPIRED_CLOSE_CODE;
console.log(expired, backoffDelay(3, { baseMs: 500, maxMs: 30_000 }), qualityScore({ srttMs: 40 }));
const failure = new FerrocastError('timeout', 'no answer');
const code: string = failure.code;
console.log(code, failure instanceof Error);
client.close();

// Misuse the declarations must refuse.
// @ts-expect-error: no such event
client.on('message', () => {});
// @ts-expect-error: a transport is 'websocket' or 'sse'
new Ferrocast({ transports: ['long-polling'] });
// @ts-expect-error: the connected detail has no attempt
client.on('connected', (d) => console.log(d.attempt));
// @ts-expect-error: a channel is a string
client.subscribe(42, () => {});
// @ts-expect-error: state is read-only
client.state = 'connected';
// @ts-expect-error: not a state
const bogus: State = 'open';
console.log(bogus);
