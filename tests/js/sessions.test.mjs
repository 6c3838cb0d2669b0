// The official @trigger.dev/core 4.8.3 client against this service (SPEC §1, §4, §7).
// Started by tests/tests/official_client.rs with SESSIONS_API_URL and SESSIONS_SECRET_KEY.
import { test } from "node:test";
import assert from "node:assert/strict";
import { ApiClient } from "@trigger.dev/core/v3";
import { generateJWT } from "@trigger.dev/core/v3/jwt";

const baseUrl = process.env.SESSIONS_API_URL;
const secretKey = process.env.SESSIONS_SECRET_KEY;
assert.ok(baseUrl && secretKey, "SESSIONS_API_URL and SESSIONS_SECRET_KEY must be set");
const client = new ApiClient(baseUrl, secretKey);

const uniqueId = (label) => `${label}-${Date.now()}-${Math.random().toString(36).slice(2)}`;

async function createSession(externalId) {
  return client.createSession({
    type: "chat.agent",
    externalId,
    taskIdentifier: "agent",
    triggerConfig: { basePayload: { chatId: externalId } },
  });
}

async function recordsWhen(externalId, io, count, options = {}) {
  const deadline = Date.now() + 20_000;
  for (;;) {
    const { records } = await client.readSessionStreamRecords(externalId, io, options);
    if (records.length >= count || Date.now() > deadline) return records;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

async function collect(stream, count, timeoutMs = 20_000) {
  const reader = stream.getReader();
  const parts = [];
  const timer = setTimeout(() => reader.cancel(), timeoutMs);
  try {
    while (parts.length < count) {
      const { done, value } = await reader.read();
      if (done) break;
      parts.push(value);
    }
  } finally {
    clearTimeout(timer);
    // Cancelling closes the connection instead of leaving it open until its deadline.
    await reader.cancel().catch(() => {});
  }
  return parts;
}

test("create is idempotent and the response passes the client's schema", async () => {
  const externalId = uniqueId("create");
  const created = await createSession(externalId);
  assert.equal(created.isCached, false);
  assert.match(created.id, /^session_/);
  assert.match(created.runId, /^run_/);
  assert.equal(created.externalId, externalId);
  assert.ok(created.publicAccessToken.split(".").length === 3);
  const again = await createSession(externalId);
  assert.equal(again.isCached, true);
  assert.equal(again.id, created.id);
  assert.equal(again.runId, created.runId);
});

test("append with the client's part ids, then read the records route", async () => {
  const externalId = uniqueId("append");
  await createSession(externalId);
  for (const n of [0, 1, 2]) {
    const result = await client.appendToSessionStream(externalId, "in", JSON.stringify({ n }));
    assert.equal(result.ok, true);
  }
  const records = await recordsWhen(externalId, "in", 3);
  assert.deepEqual(records.map((record) => record.seqNum), [0, 1, 2]);
  assert.deepEqual(records.map((record) => JSON.parse(record.data).n), [0, 1, 2]);
  assert.ok(records.every((record) => record.id.length > 0), "the client's nanoid part ids are kept");
  const after = await client.readSessionStreamRecords(externalId, "in", { afterEventId: "1" });
  assert.deepEqual(after.records.map((record) => record.seqNum), [2]);
});

test("live SSE delivery in order of records appended after subscribing", async () => {
  const externalId = uniqueId("live");
  await createSession(externalId);
  const seen = [];
  const stream = await client.subscribeToSessionStream(externalId, "out", {
    timeoutInSeconds: 30,
    onPart: (part) => seen.push(part),
  });
  const reading = collect(stream, 5);
  for (const n of [0, 1, 2, 3, 4]) {
    await client.appendToSessionStream(externalId, "out", `chunk-${n}`);
  }
  const chunks = await reading;
  assert.deepEqual(chunks, ["chunk-0", "chunk-1", "chunk-2", "chunk-3", "chunk-4"]);
  assert.deepEqual(seen.map((part) => part.id), ["0", "1", "2", "3", "4"]);
  assert.ok(seen.every((part) => typeof part.recordId === "string" && part.recordId.length > 0));
  // What SSE delivered equals the records route.
  const records = await recordsWhen(externalId, "out", 5);
  assert.deepEqual(records.map((record) => record.data), chunks);
});

test("resume with lastEventId continues at N+1 without duplicates", async () => {
  const externalId = uniqueId("resume");
  await createSession(externalId);
  for (const n of [0, 1, 2, 3, 4]) {
    await client.appendToSessionStream(externalId, "out", `r-${n}`);
  }
  await recordsWhen(externalId, "out", 5);
  const stream = await client.subscribeToSessionStream(externalId, "out", {
    lastEventId: "2",
    timeoutInSeconds: 2,
  });
  const chunks = await collect(stream, 10, 10_000);
  assert.deepEqual(chunks, ["r-3", "r-4"]);
});

test("the stream ends cleanly at Timeout-Seconds", async () => {
  const externalId = uniqueId("deadline");
  await createSession(externalId);
  const started = Date.now();
  let completed = false;
  const stream = await client.subscribeToSessionStream(externalId, "in", {
    timeoutInSeconds: 1,
    onComplete: () => {
      completed = true;
    },
  });
  const parts = await collect(stream, 1, 15_000);
  assert.equal(parts.length, 0);
  assert.ok(completed, "onComplete fired: a clean end, not an error");
  assert.ok(Date.now() - started >= 900);
});

test("an unknown session_ id is a 404 the client does not retry", async () => {
  let failure;
  try {
    const stream = await client.subscribeToSessionStream("session_doesnotexist", "in", {
      timeoutInSeconds: 5,
    });
    await collect(stream, 1, 10_000);
  } catch (error) {
    failure = error;
  }
  assert.ok(failure, "subscribing to an unknown session fails");
  assert.equal(failure.status, 404);
});

test("a token minted locally with generateJWT and the claims route works like a browser's", async () => {
  const externalId = uniqueId("browser");
  await createSession(externalId);
  const claims = await client.generateJWTClaims();
  const jwt = await generateJWT({
    secretKey,
    payload: { ...claims, scopes: [`read:sessions:${externalId}`, `write:sessions:${externalId}`] },
    expirationTime: "15m",
  });
  const browser = new ApiClient(baseUrl, jwt);
  assert.equal((await browser.appendToSessionStream(externalId, "in", "typed in a browser")).ok, true);
  const records = await (async () => {
    const deadline = Date.now() + 20_000;
    for (;;) {
      const { records } = await browser.readSessionStreamRecords(externalId, "in");
      if (records.length > 0 || Date.now() > deadline) return records;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  })();
  assert.deepEqual(records.map((record) => record.data), ["typed in a browser"]);
  await assert.rejects(browser.appendToSessionStream(externalId, "out", "not allowed"), (error) => error.status === 403);
  await assert.rejects(browser.readSessionStreamRecords(uniqueId("other"), "in"), (error) => error.status === 403);
});

test("a run waits for the next input through the client's waitpoint calls", async () => {
  const externalId = uniqueId("agent");
  const created = await createSession(externalId);
  const { waitpointId, isCached } = await client.createSessionStreamWaitpoint(created.runId, {
    session: externalId,
    io: "in",
    timeout: "1h",
  });
  assert.equal(isCached, false);
  assert.equal((await client.retrieveWaitpointToken(waitpointId)).status, "WAITING");
  await client.appendToSessionStream(externalId, "in", JSON.stringify({ text: "next message" }));
  const deadline = Date.now() + 20_000;
  let waitpoint;
  do {
    waitpoint = await client.retrieveWaitpointToken(waitpointId);
    if (waitpoint.status !== "WAITING") break;
    await new Promise((resolve) => setTimeout(resolve, 100));
  } while (Date.now() < deadline);
  assert.equal(waitpoint.status, "COMPLETED");
  assert.deepEqual(JSON.parse(waitpoint.output), { text: "next message" });
  assert.equal(waitpoint.outputIsError, false);
});

test("retrieve, update, list, end-and-continue and close pass the client's schemas", async () => {
  const externalId = uniqueId("manage");
  const created = await createSession(externalId);
  const retrieved = await client.retrieveSession(externalId);
  assert.equal(retrieved.id, created.id);
  assert.equal(retrieved.currentRunId, created.runId);
  const updated = await client.updateSession(externalId, { tags: ["vip"], metadata: { plan: "pro" } });
  assert.deepEqual(updated.tags, ["vip"]);
  assert.deepEqual(updated.metadata, { plan: "pro" });
  const page = await client.listSessions({ externalId, limit: 5 });
  assert.deepEqual(page.data.map((session) => session.id), [created.id]);
  const handoff = await client.endAndContinueSession(externalId, { callingRunId: created.runId, reason: "upgrade" });
  assert.equal(handoff.swapped, true);
  assert.notEqual(handoff.runId, created.runId);
  const closed = await client.closeSession(externalId, { reason: "done" });
  assert.equal(closed.closedReason, "done");
  assert.ok(closed.closedAt instanceof Date);
});

// Issue 3's walk through the whole session API with the official client, without retries.
const noRetry = { retry: { maxAttempts: 1 } };
const strictClient = new ApiClient(baseUrl, secretKey, undefined, noRetry);
const statusOf = async (promise) => {
  try {
    await promise;
    return 200;
  } catch (error) {
    return error.status;
  }
};

test("the whole session API through ApiClient with a secret key and with the session token", async () => {
  const prefix = uniqueId("walk");
  const externalId = `${prefix}-main`;
  const created = await strictClient.createSession({
    type: "chat.agent",
    externalId,
    taskIdentifier: "agent",
    triggerConfig: { basePayload: {} },
    tags: [prefix],
  });
  const other = await strictClient.createSession({
    type: "chat.agent",
    externalId: `${prefix}-other`,
    taskIdentifier: "agent",
    triggerConfig: { basePayload: {} },
    tags: [prefix],
  });
  // Retrieve by both id forms.
  assert.equal((await strictClient.retrieveSession(externalId)).id, created.id);
  assert.equal((await strictClient.retrieveSession(created.id)).externalId, externalId);
  // List with auto-pagination, one per page.
  const listed = [];
  for await (const session of strictClient.listSessions({ tag: prefix, limit: 1 })) {
    listed.push(session.id);
  }
  assert.deepEqual(listed, [other.id, created.id]);
  // Update, append, records, snapshot round trip, claims.
  assert.deepEqual((await strictClient.updateSession(externalId, { metadata: { a: 1 } })).metadata, { a: 1 });
  await strictClient.appendToSessionStream(externalId, "in", "hello");
  assert.equal((await recordsWhen(externalId, "in", 1)).length, 1);
  const { presignedUrl: putUrl } = await strictClient.createChatSnapshotUploadUrl(externalId);
  const snapshot = new Uint8Array([1, 2, 3, 250]);
  assert.equal((await fetch(putUrl, { method: "PUT", body: snapshot })).status, 200);
  const { presignedUrl: getUrl } = await strictClient.getChatSnapshotUrl(externalId);
  const fetched = new Uint8Array(await (await fetch(getUrl)).arrayBuffer());
  assert.deepEqual([...fetched], [...snapshot]);
  const claims = await strictClient.generateJWTClaims();
  assert.equal(claims.pub, true);
  assert.match(claims.sub, /^env_/);

  // The session's own token: allowed on its session's retrieve, records and `in` append.
  const browser = new ApiClient(baseUrl, created.publicAccessToken, undefined, noRetry);
  assert.equal((await browser.retrieveSession(externalId)).id, created.id);
  assert.equal((await browser.appendToSessionStream(externalId, "in", "from the token")).ok, true);
  assert.ok((await browser.readSessionStreamRecords(externalId, "in")).records.length >= 1);
  // …and forbidden elsewhere.
  assert.equal(await statusOf(browser.appendToSessionStream(externalId, "out", "x")), 403);
  assert.equal(await statusOf(browser.retrieveSession(other.id)), 403);
  assert.equal(await statusOf(browser.readSessionStreamRecords(`${prefix}-other`, "in")), 403);
  assert.equal(await statusOf(browser.getChatSnapshotUrl(`${prefix}-other`)), 403);
  assert.equal(await statusOf(browser.updateSession(externalId, { tags: [] })), 403);
  assert.equal(await statusOf(browser.closeSession(externalId)), 403);

  // Tokens minted with the wrong key, or expired, are refused.
  const wrongKey = await generateJWT({
    secretKey: "tr_sk_not_the_key",
    payload: { ...claims, scopes: [`read:sessions:${externalId}`] },
  });
  assert.equal(await statusOf(new ApiClient(baseUrl, wrongKey, undefined, noRetry).retrieveSession(externalId)), 401);
  const expired = await generateJWT({
    secretKey,
    payload: { ...claims, scopes: [`read:sessions:${externalId}`] },
    expirationTime: Math.floor(Date.now() / 1000) - 60,
  });
  assert.equal(await statusOf(new ApiClient(baseUrl, expired, undefined, noRetry).retrieveSession(externalId)), 401);

  const closed = await strictClient.closeSession(externalId, { reason: "walked" });
  assert.equal(closed.closedReason, "walked");
});
