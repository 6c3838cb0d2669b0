// The official @trigger.dev/sdk 4.8.3 *writer* half against this service: `sessions.open(id).out`
// (and `.channel(name).out`) `append`, `pipe`, `writer`, `writeControl` and `trimTo`. The SDK
// PUTs `/realtime/v1/sessions/{id}/out` for S2 credentials, then writes over S2's protocol to
// the `x-s2-endpoint` it is given: streaming writers over an h2c s2s append session, control
// records (JSON) and trims (protobuf) over S2's REST append. Read back with the official
// `ApiClient` (records route and SSE). Started with SESSIONS_API_URL and SESSIONS_SECRET_KEY.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { SSEStreamSubscription } from "@trigger.dev/core/v3";
import { sessions } from "@trigger.dev/sdk";
import {
  baseUrl,
  client,
  collect,
  createSession,
  recordsUntil,
  recordsWhen,
  secretKey,
  sleep,
  uniqueId,
} from "./helpers.mjs";

const range = (count, from = 0) => Array.from({ length: count }, (_, i) => from + i);

/** How many keys repeat an earlier one (nothing is deduplicated away before counting). */
function duplicates(keys) {
  const seen = new Set();
  let repeated = 0;
  for (const key of keys) {
    if (seen.has(key)) repeated++;
    else seen.add(key);
  }
  return repeated;
}

/** A ReadableStream of `make(0) … make(count - 1)`; `tick` yields to the event loop per chunk. */
function streamOf(count, make, { tick = false } = {}) {
  let n = 0;
  return new ReadableStream({
    async pull(controller) {
      if (tick) await new Promise((resolve) => setImmediate(resolve));
      if (n >= count) controller.close();
      else controller.enqueue(make(n++));
    },
  });
}

/** An async iterable of `make(0) … make(count - 1)`, pausing every 10 chunks. */
async function* paced(count, make) {
  for (let n = 0; n < count; n++) {
    if (n % 10 === 0) await sleep(5);
    yield make(n);
  }
}

test("out.append: each chunk once, in order, with the data appended", async () => {
  const externalId = uniqueId("w-append");
  await createSession(externalId);
  // One handle: its S2 credentials (one PUT) are shared by every append.
  const out = sessions.open(externalId).out;
  const values = [
    { type: "text-delta", delta: "Hi" },
    "plain text",
    { n: 3, nested: { list: [1, 2, "x"], ok: true, none: null } },
    'unicode ✓, "quotes" and a\nnewline',
    42,
  ];
  for (const value of values) await out.append(value);
  const records = await recordsWhen(externalId, "out", values.length);
  assert.deepEqual(records.map((record) => record.seqNum), range(values.length));
  assert.deepEqual(records.map((record) => record.data), values);
  assert.ok(records.every((record) => typeof record.id === "string" && record.id.length > 0), "the writer's part ids are kept");
  assert.equal(duplicates(records.map((record) => record.id)), 0);
  assert.ok(records.every((record) => (record.headers ?? []).length === 0), "data records carry no headers");
  // SSE hands the reader the same chunks (the envelope's `data`, parsed).
  const chunks = await collect(await client.subscribeToSessionStream(externalId, "out", { timeoutInSeconds: 5 }), values.length, 10_000);
  assert.deepEqual(chunks, values);
});

test("out.pipe of 1,000 chunks: each exactly once, in order, on the records route and over SSE", async () => {
  const externalId = uniqueId("w-pipe");
  await createSession(externalId);
  const count = 1000;
  const make = (n) => ({ n, text: `chunk-${n}` });
  const expected = range(count).map(make);
  const { waitUntilComplete } = sessions.open(externalId).out.pipe(streamOf(count, make));
  const { lastEventId } = await waitUntilComplete();
  assert.equal(lastEventId, String(count - 1), "the writer's last acked record is the last chunk");
  const records = await recordsWhen(externalId, "out", count);
  // Duplicates are counted, not filtered: a record stored twice (a resubmitted batch) fails here.
  assert.equal(duplicates(records.map((record) => record.data?.n)), 0, "no chunk is stored twice");
  assert.equal(duplicates(records.map((record) => record.id)), 0, "no part id is stored twice");
  assert.equal(records.length, count);
  assert.deepEqual(records.map((record) => record.seqNum), range(count));
  assert.deepEqual(records.map((record) => record.data), expected);

  // The official SSE reader drops a repeated part id itself, so a duplicate would show there as a
  // gap in the seqNums it reports: require them contiguous.
  const seen = [];
  const stream = await client.subscribeToSessionStream(externalId, "out", {
    timeoutInSeconds: 10,
    onPart: (part) => seen.push(part),
  });
  const chunks = await collect(stream, count, 20_000);
  assert.equal(chunks.length, count);
  assert.deepEqual(chunks, expected);
  assert.deepEqual(seen.map((part) => part.id), range(count).map(String));
  assert.deepEqual(seen.map((part) => part.recordId), records.map((record) => record.id));
});

test("out.writer with write and merge: every chunk present, each merged stream in its order", async () => {
  const externalId = uniqueId("w-writer");
  await createSession(externalId);
  const per = 200;
  const { waitUntilComplete } = sessions.open(externalId).out.writer({
    execute: async ({ write, merge }) => {
      write({ source: "head", n: 0 });
      merge(streamOf(per, (n) => ({ source: "a", n }), { tick: true }));
      merge(streamOf(per, (n) => ({ source: "b", n }), { tick: true }));
      await sleep(20);
      write({ source: "tail", n: 0 });
    },
  });
  const total = 2 * per + 2;
  const { lastEventId } = await waitUntilComplete();
  assert.equal(lastEventId, String(total - 1));
  const records = await recordsWhen(externalId, "out", total);
  const keys = records.map((record) => `${record.data?.source}:${record.data?.n}`);
  assert.equal(duplicates(keys), 0, "no chunk is stored twice");
  assert.equal(records.length, total);
  assert.deepEqual(records.map((record) => record.seqNum), range(total));
  assert.deepEqual(records[0].data, { source: "head", n: 0 }, "written before the merges start");
  for (const source of ["a", "b"]) {
    const ns = records.filter((record) => record.data.source === source).map((record) => record.data.n);
    assert.deepEqual(ns, range(per), `stream ${source}: all its chunks, in its order`);
  }
  assert.equal(keys.filter((key) => key === "tail:0").length, 1);
});

test("out.writeControl after data: the control record and its headers; X-Peek-Settled answers settled", async () => {
  const externalId = uniqueId("w-control");
  await createSession(externalId);
  const out = sessions.open(externalId).out;
  const deltas = [
    { type: "text-delta", delta: "Hel" },
    { type: "text-delta", delta: "lo" },
  ];
  for (const delta of deltas) await out.append(delta);
  const extra = [
    ["public-access-token", "pat-123"],
    ["session-in-event-id", "7"],
  ];
  const controlHeaders = [["trigger-control", "turn-complete"], ...extra];
  const { lastEventId } = await out.writeControl("turn-complete", extra);
  assert.equal(lastEventId, "2", "writeControl returns its record's own seqNum");

  const records = await recordsWhen(externalId, "out", 3);
  assert.deepEqual(records.map((record) => record.seqNum), [0, 1, 2]);
  assert.deepEqual(records.slice(0, 2).map((record) => record.data), deltas);
  assert.deepEqual(records[2].headers, controlHeaders);
  assert.equal(records[2].data, "", "a control record has no body");
  assert.equal(records[2].id, "");

  // The official reader routes the control record to onControl and enqueues only data.
  const controls = [];
  const stream = await client.subscribeToSessionStream(externalId, "out", {
    timeoutInSeconds: 2,
    onControl: (control) => controls.push(control),
  });
  const chunks = await collect(stream, 3, 10_000);
  assert.deepEqual(chunks, deltas);
  assert.deepEqual(
    controls.map(({ subtype, headers, seqNum }) => ({ subtype, headers, seqNum })),
    [{ subtype: "turn-complete", headers: controlHeaders, seqNum: 2 }],
  );

  // The chat client's settle probe: the SDK's own SSE subscriber with `X-Peek-Settled: 1`.
  const subscription = new SSEStreamSubscription(
    `${baseUrl}/realtime/v1/sessions/${encodeURIComponent(externalId)}/out`,
    {
      headers: { Authorization: `Bearer ${secretKey}`, "X-Peek-Settled": "1" },
      timeoutInSeconds: 30,
      maxRetries: 0,
    },
  );
  const started = Date.now();
  const parts = await collect(await subscription.subscribe(), 100, 20_000);
  assert.equal(subscription.sessionSettled, true, "the answer carries X-Session-Settled: true");
  assert.ok(Date.now() - started < 15_000, "a settled answer ends after catch-up, not at its deadline");
  assert.deepEqual(parts.map((part) => part.id), ["0", "1", "2"]);
  assert.deepEqual(parts.slice(0, 2).map((part) => part.chunk), deltas);
  assert.deepEqual(parts[2].headers, controlHeaders);
});

test("out.trimTo(n): nothing below n on the records route or in SSE catch-up; the trim takes a seqNum", async () => {
  const externalId = uniqueId("w-trim");
  await createSession(externalId);
  const out = sessions.open(externalId).out;
  await out.pipe(streamOf(10, (n) => ({ n }))).waitUntilComplete(); // seqNums 0–9
  await out.trimTo(5); // the trim record is seqNum 10; records below 5 go
  const trimmed = await recordsUntil(externalId, "out", (records) => records[0]?.seqNum >= 5);
  assert.deepEqual(trimmed.map((record) => record.seqNum), range(5, 5));
  assert.deepEqual(trimmed.map((record) => record.data), range(5, 5).map((n) => ({ n })));
  // A cursor below the trim point does not bring trimmed records back.
  const after = await client.readSessionStreamRecords(externalId, "out", { afterEventId: "1" });
  assert.deepEqual(after.records.map((record) => record.seqNum), range(5, 5));

  // SSE catch-up from the start, and from a Last-Event-ID below the trim point.
  for (const lastEventId of [undefined, "2"]) {
    const seen = [];
    const stream = await client.subscribeToSessionStream(externalId, "out", {
      timeoutInSeconds: 2,
      lastEventId,
      onPart: (part) => seen.push(part.id),
    });
    const chunks = await collect(stream, 10, 10_000);
    assert.deepEqual(chunks, range(5, 5).map((n) => ({ n })), `catch-up after ${lastEventId}`);
    assert.deepEqual(seen, range(5, 5).map(String));
  }

  // The trim record took seqNum 10, so the next chunk is 11.
  await out.append({ n: 10 });
  // A backward trim deletes nothing (the point stays 5) and still takes a seqNum (12).
  await out.trimTo(2);
  await out.append({ n: 11 });
  const later = await recordsUntil(externalId, "out", (records) => records.at(-1)?.seqNum >= 13);
  assert.deepEqual(later.map((record) => record.seqNum), [5, 6, 7, 8, 9, 11, 13]);
  assert.deepEqual(later.map((record) => record.data.n), [5, 6, 7, 8, 9, 10, 11]);

  // A trim past the tail is clamped to it (seqNum 14): all earlier records go, later ones stay.
  await out.trimTo(1_000);
  await out.append({ n: 12 });
  const clamped = await recordsUntil(externalId, "out", (records) => records[0]?.seqNum >= 15);
  assert.deepEqual(clamped.map((record) => record.seqNum), [15]);
  assert.deepEqual(clamped.map((record) => record.data), [{ n: 12 }]);
});

test("a named channel's out: append, pipe, writer with merge, writeControl and trimTo through .channel(name).out", async () => {
  const externalId = uniqueId("w-channel");
  await createSession(externalId);
  const notes = sessions.open(externalId).channel("notes");
  await notes.out.append({ note: "first" });
  await notes.out.append("second");
  const { lastEventId } = await notes.out.pipe(paced(5, (n) => ({ note: n }))).waitUntilComplete();
  assert.equal(lastEventId, "6");
  const expected = [{ note: "first" }, "second", ...range(5).map((n) => ({ note: n }))];
  const records = await recordsWhen(externalId, "out", expected.length, { channel: "notes" });
  assert.deepEqual(records.map((record) => record.seqNum), range(expected.length));
  assert.deepEqual(records.map((record) => record.data), expected);
  assert.equal(duplicates(records.map((record) => record.id)), 0);
  // Its own sequence: the reserved `out` (and another channel) got nothing.
  assert.deepEqual((await client.readSessionStreamRecords(externalId, "out")).records, []);
  assert.deepEqual((await client.readSessionStreamRecords(externalId, "out", { channel: "other" })).records, []);
  // A reader tails it with the SDK.
  const chunks = await collect(await notes.out.read({ timeoutInSeconds: 5 }), expected.length, 10_000);
  assert.deepEqual(chunks, expected);

  const control = await notes.out.writeControl("turn-complete");
  assert.equal(control.lastEventId, String(expected.length));
  const withControl = await recordsWhen(externalId, "out", expected.length + 1, { channel: "notes" });
  assert.deepEqual(withControl.at(-1).headers, [["trigger-control", "turn-complete"]]);
  assert.equal(withControl.at(-1).seqNum, expected.length);
  assert.deepEqual((await client.readSessionStreamRecords(externalId, "out")).records, []);

  // `writer` with `merge` on the channel: the merged stream's chunks in their order.
  const merged = range(4).map((n) => ({ merged: n }));
  const { lastEventId: afterWriter } = await notes.out
    .writer({
      execute: ({ write, merge }) => {
        write({ merged: "head" });
        merge(streamOf(4, (n) => ({ merged: n })));
      },
    })
    .waitUntilComplete();
  const first = expected.length + 1; // after the control record
  assert.equal(afterWriter, String(first + merged.length));
  const written = await recordsWhen(externalId, "out", first + 1 + merged.length, { channel: "notes" });
  assert.deepEqual(written.slice(first).map((record) => record.data), [{ merged: "head" }, ...merged]);

  // `trimTo` on the channel hides what is below its point, there only.
  await notes.out.trimTo(first);
  const trimmed = await recordsUntil(
    externalId,
    "out",
    (records) => records.length > 0 && records[0].seqNum >= first,
    { channel: "notes" },
  );
  assert.deepEqual(trimmed.map((record) => record.seqNum), range(1 + merged.length, first));
  assert.deepEqual(trimmed.map((record) => record.data), [{ merged: "head" }, ...merged]);
  assert.deepEqual((await client.readSessionStreamRecords(externalId, "out")).records, []);
});

/** `promise`'s value, or null if it has not settled within `ms`. */
function within(promise, ms) {
  let timer;
  const timeout = new Promise((resolve) => {
    timer = setTimeout(() => resolve(null), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Lines a child prints; `next(re)` waits for the first one matching `re`. */
function linesOf(child) {
  const lines = [];
  const waiters = new Set();
  let closed = false;
  const wake = () => waiters.forEach((check) => check());
  createInterface({ input: child.stdout }).on("line", (line) => {
    lines.push(line);
    wake();
  });
  child.once("close", () => {
    closed = true;
    wake();
  });
  return {
    next(re, timeoutMs = 30_000) {
      return new Promise((resolve, reject) => {
        const finish = (settle, value) => {
          clearTimeout(timer);
          waiters.delete(check);
          settle(value);
        };
        const check = () => {
          const line = lines.find((candidate) => re.test(candidate));
          if (line !== undefined) finish(resolve, line);
          else if (closed) finish(reject, new Error(`the child ended without printing ${re} (printed: ${lines.join(" | ")})`));
        };
        const timer = setTimeout(() => finish(reject, new Error(`no ${re} from the child in ${timeoutMs} ms`)), timeoutMs);
        waiters.add(check);
        check();
      });
    },
  };
}

test("two SDK processes pipe to one session's out at once: every chunk once, each writer's in order", async (t) => {
  const externalId = uniqueId("w-two");
  await createSession(externalId);
  const count = 500;
  const child = spawn(
    process.execPath,
    [fileURLToPath(new URL("./writer-child.mjs", import.meta.url)), externalId, "child", String(count)],
    { env: process.env, stdio: ["pipe", "pipe", "inherit"] },
  );
  const closed = new Promise((resolve) => child.once("close", (code, signal) => resolve({ code, signal })));
  const lines = linesOf(child);
  try {
    await lines.next(/^ready$/);
    child.stdin.on("error", () => {}); // a child that already died must fail the test, not crash it
    child.stdin.end("go\n");
    const mine = sessions.open(externalId).out.pipe(paced(count, (n) => ({ writer: "parent", n })));
    const [, done] = await Promise.all([mine.waitUntilComplete(), lines.next(/^done /, 60_000)]);
    assert.match(done, /^done \d+$/);

    const records = await recordsWhen(externalId, "out", 2 * count);
    const keys = records.map((record) => `${record.data?.writer}:${record.data?.n}`);
    assert.equal(duplicates(keys), 0, "no chunk is stored twice");
    assert.equal(records.length, 2 * count);
    assert.deepEqual(records.map((record) => record.seqNum), range(2 * count));
    for (const writer of ["parent", "child"]) {
      const ns = records.filter((record) => record.data.writer === writer).map((record) => record.data.n);
      assert.deepEqual(ns, range(count), `${writer}: all its chunks, in its order`);
    }
    const switches = records.filter((record, i) => i > 0 && record.data.writer !== records[i - 1].data.writer).length;
    t.diagnostic(`the two writers' records alternate ${switches} times in the stream`);

    // The child ends by itself once its work is done: the server closes the idle HTTP/2
    // connection (GOAWAY) that the S2 SDK's connection pool otherwise keeps open.
    const ended = await within(closed, 30_000);
    assert.ok(ended, "the child process ended on its own within 30 s of its last write");
    assert.deepEqual(ended, { code: 0, signal: null });
  } finally {
    if (child.exitCode === null && child.signalCode === null) child.kill();
  }
});
