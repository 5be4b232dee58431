// Reference pipeline for the shardworker benchmarks: imapflow + mailparser on Node,
// the stack under Alga's own IMAP listener.  Fetch + parse only: nothing is published.
//
//   node reference.mjs latency --host H --port P [--tls --ca FILE] --users FILE
//   node reference.mjs drain   --host H --port P [--tls --ca FILE] --user U --pass P [--batch N]
//                              [--no-parse]
//
// latency: one session per user (FILE: JSON array of [user, password]), each EXAMINEd on
//   INBOX and IDLE.  On 'exists' the new messages are fetched by UID (source) and parsed
//   with simpleParser; one JSON line per message goes to stdout:
//   {"event":"parsed","user":..,"uid":..,"mid":..,"t_ns":..}, t_ns from
//   process.hrtime (CLOCK_MONOTONIC, the clock Python's time.monotonic reads).
//   {"event":"ready",...} is printed once every session idles; the process exits when
//   stdin closes.
// drain: fetch every message of INBOX (one UID FETCH 1:*, or ranges of --batch UIDs)
//   and parse each; prints {"event":"drained","messages":..,"seconds":..,"bytes":..,
//   "rate":..,"cpu_ms_per_msg":..} (CPU of this process: robust on a busy machine).
//
// The bench/reference_compare.py driver starts the Dovecot, loads the mail and runs this.

import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { ImapFlow } from 'imapflow';
import { simpleParser } from 'mailparser';

const CONNECT_CONCURRENCY = 16;

const { positionals, values: opts } = parseArgs({
    allowPositionals: true,
    options: {
        host: { type: 'string', default: '127.0.0.1' },
        port: { type: 'string' },
        tls: { type: 'boolean', default: false },
        ca: { type: 'string' },
        users: { type: 'string' },
        user: { type: 'string' },
        pass: { type: 'string' },
        batch: { type: 'string', default: '0' },
        'no-parse': { type: 'boolean', default: false }
    }
});

const emit = obj => process.stdout.write(JSON.stringify(obj) + '\n');
const now = () => process.hrtime.bigint();

function makeClient(user, pass, extra = {}) {
    return new ImapFlow({
        host: opts.host,
        port: Number(opts.port),
        secure: opts.tls,
        // Plain means plain, as for shardworker's plain providers: no STARTTLS upgrade.
        doSTARTTLS: opts.tls ? undefined : false,
        tls: opts.ca ? { ca: readFileSync(opts.ca) } : undefined,
        auth: { user, pass },
        logger: false,
        ...extra
    });
}

// One session: EXAMINE INBOX, remember UIDNEXT-1, and on every EXISTS fetch + parse
// what is above it.  Events for a session are handled one at a time, in order.
async function startSession(user, pass) {
    // autoIdleDelay 0: back in IDLE right after each fetch, the reference's best case.
    const client = makeClient(user, pass, { autoIdleDelay: 0 });
    await client.connect();
    const box = await client.mailboxOpen('INBOX', { readOnly: true });
    let lastUid = Number(box.uidNext) - 1;
    let chain = Promise.resolve();
    client.on('exists', () => {
        chain = chain.then(async () => {
            for await (const msg of client.fetch(`${lastUid + 1}:*`, { uid: true, source: true }, { uid: true })) {
                if (msg.uid <= lastUid) continue; // n:* also matches the top UID
                const parsed = await simpleParser(msg.source);
                emit({ event: 'parsed', user, uid: msg.uid, mid: parsed.messageId || null, t_ns: now().toString() });
                lastUid = Math.max(lastUid, msg.uid);
            }
        }).catch(err => emit({ event: 'error', user, error: String(err && err.message) }));
    });
    client.on('error', err => emit({ event: 'error', user, error: String(err && err.message) }));
    return client;
}

async function latency() {
    const users = JSON.parse(readFileSync(opts.users, 'utf8'));
    const started = Date.now();
    const clients = [];
    let next = 0;
    const worker = async () => {
        while (next < users.length) {
            const [user, pass] = users[next++];
            clients.push(await startSession(user, pass));
        }
    };
    await Promise.all(Array.from({ length: CONNECT_CONCURRENCY }, worker));
    while (clients.some(c => !c.idling)) {
        await new Promise(resolve => setTimeout(resolve, 50));
    }
    emit({ event: 'ready', sessions: clients.length, connect_s: (Date.now() - started) / 1000, rss_kib: Math.round(process.memoryUsage().rss / 1024) });
    process.stdin.resume();
    await new Promise(resolve => process.stdin.on('end', resolve));
    await Promise.allSettled(clients.map(c => c.logout()));
}

async function drain() {
    const client = makeClient(opts.user, opts.pass);
    await client.connect();
    const box = await client.mailboxOpen('INBOX', { readOnly: true });
    const top = Number(box.uidNext) - 1;
    const batch = Number(opts.batch) || top;
    let messages = 0;
    let bytes = 0;
    const started = now();
    const cpu0 = process.cpuUsage();
    for (let low = 1; low <= top; low += batch) {
        const range = `${low}:${Math.min(top, low + batch - 1)}`;
        for await (const msg of client.fetch(range, { uid: true, source: true }, { uid: true })) {
            if (opts['no-parse']) {
                messages += 1; // fetch only: splits the drain's cost into IMAP and parsing
            } else {
                const parsed = await simpleParser(msg.source);
                if (parsed.messageId) messages += 1;
            }
            bytes += msg.source.length;
        }
    }
    const seconds = Number(now() - started) / 1e9;
    const cpu = process.cpuUsage(cpu0);
    const cpuMsPerMsg = (cpu.user + cpu.system) / 1000 / messages;
    emit({ event: 'drained', messages, seconds, bytes, rate: messages / seconds, cpu_ms_per_msg: cpuMsPerMsg });
    await client.logout();
}

const mode = positionals[0];
if (mode === 'latency') {
    await latency();
} else if (mode === 'drain') {
    await drain();
} else {
    console.error('usage: node reference.mjs latency|drain --host H --port P ...');
    process.exit(2);
}
