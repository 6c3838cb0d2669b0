// The official @trigger.dev/core 4.8.3 client against this service (README "Routes").
// Started by tests/tests/official_client.rs with SESSIONS_API_URL and SESSIONS_SECRET_KEY.
import { test } from "node:test";
import assert from "node:assert/strict";
import { ApiClient } from "@trigger.dev/core/v3";
import { generateJWT } from "@trigger.dev/core/v3/jwt";
import { sessions } from "@trigger.dev/sdk";
import {
  baseUrl,
  client,
  collect,
  createSession,
  recordsWhen,
  secretKey,
  uniqueId,
} from "./helpers.mjs";

/** The waitpoint once it is no longer WAITING (or as it is after 20 s). */
async function settledWaitpoint(waitpointId) {
  const deadline = Date.now() + 20_000;
  for (;;) {
    const waitpoint = await client.retrieveWaitpointToken(waitpointId);
    if (waitpoint.status !== "WAITING" || Date.now() > deadline) return waitpoint;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
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
  // The agent (secret key) reads what the browser typed; the browser itself reads only `out`.
  const records = await recordsWhen(externalId, "in", 1);
  assert.deepEqual(records.map((record) => record.data), ["typed in a browser"]);
  await assert.rejects(browser.readSessionStreamRecords(externalId, "in"), (error) => error.status === 403);
  assert.deepEqual((await browser.readSessionStreamRecords(externalId, "out")).records, []);
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
  const waitpoint = await settledWaitpoint(waitpointId);
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
  assert.ok(Array.isArray((await browser.readSessionStreamRecords(externalId, "out")).records));
  // Since 4.6 a public token does not read `in` (user messages): that needs the secret key.
  assert.equal(await statusOf(browser.readSessionStreamRecords(externalId, "in")), 403);
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

// The 4.8 surface: closed-session refusal, `seq` on `in` appends, the newer token policy, the
// close message.

test("an append to a closed session is the terminal 409 session_closed", async () => {
  const externalId = uniqueId("closed");
  await strictClient.createSession({
    type: "chat.agent",
    externalId,
    taskIdentifier: "agent",
    triggerConfig: { basePayload: {} },
  });
  await strictClient.closeSession(externalId, { reason: "finished" });
  let failure;
  try {
    // The default client retries a 409 unless the server says not to: it must not here.
    await client.appendToSessionStream(externalId, "in", "too late");
  } catch (error) {
    failure = error;
  }
  assert.ok(failure, "the append was refused");
  assert.equal(failure.status, 409);
  assert.equal(failure.code, "session_closed");
  assert.equal(failure.body.closedReason, "finished");
  assert.equal(failure.headers["x-should-retry"], "false");
});

test("an `in` append answers with its record's seq, the same seq for a retry of its part id", async () => {
  const externalId = uniqueId("seq");
  await createSession(externalId);
  const append = async (partId, body) => {
    const response = await fetch(`${baseUrl}/realtime/v1/sessions/${externalId}/in/append`, {
      method: "POST",
      headers: { Authorization: `Bearer ${secretKey}`, "X-Part-Id": partId, "Content-Type": "application/json" },
      body,
    });
    assert.equal(response.status, 200);
    return response.json();
  };
  assert.equal((await append("first", '{"n":0}')).seq, 0);
  assert.equal((await append("second", '{"n":1}')).seq, 1);
  assert.equal((await append("first", '{"n":0}')).seq, 0, "a retry gets the original record's seq");
  // What the official client's append returns: `ok` (its schema drops `seq`).
  assert.equal((await client.appendToSessionStream(externalId, "in", '{"n":2}')).ok, true);
  const records = await recordsWhen(externalId, "in", 3);
  assert.deepEqual(records.map((record) => record.seqNum), [0, 1, 2]);
});

async function tokenFor(scopes) {
  const claims = await client.generateJWTClaims();
  const jwt = await generateJWT({ secretKey, payload: { ...claims, scopes }, expirationTime: "15m" });
  return new ApiClient(baseUrl, jwt, undefined, noRetry);
}

test("a `:out` scope reads only `out`; an `:in` scope appends only to `in`", async () => {
  const externalId = uniqueId("folds");
  const created = await createSession(externalId);
  await client.appendToSessionStream(externalId, "out", "answer");
  await recordsWhen(externalId, "out", 1);
  const reader = await tokenFor([`read:sessions:${externalId}:out`]);
  assert.deepEqual((await reader.readSessionStreamRecords(externalId, "out")).records.map((r) => r.data), ["answer"]);
  assert.deepEqual((await reader.readSessionStreamRecords(created.id, "out")).records.map((r) => r.data), ["answer"]);
  assert.equal(await statusOf(reader.retrieveSession(externalId)), 403);
  const parts = await collect(await reader.subscribeToSessionStream(externalId, "out", { timeoutInSeconds: 2 }), 1, 10_000);
  assert.deepEqual(parts, ["answer"]);
  const writer = await tokenFor([`write:sessions:${externalId}:in`]);
  assert.equal((await writer.appendToSessionStream(externalId, "in", "typed")).ok, true);
  assert.equal(await statusOf(writer.readSessionStreamRecords(externalId, "out")), 403);
  assert.equal(await statusOf(writer.appendToSessionStream(externalId, "out", "no")), 403);
});

test("a token creates a session only with session write and trigger permission on the task", async () => {
  const externalId = uniqueId("token-create");
  const body = { type: "chat.agent", externalId, taskIdentifier: "agent", triggerConfig: { basePayload: {} } };
  const writeOnly = await tokenFor([`write:sessions:${externalId}`]);
  assert.equal(await statusOf(writeOnly.createSession(body)), 403);
  const triggerOnly = await tokenFor(["trigger:tasks:agent"]);
  assert.equal(await statusOf(triggerOnly.createSession(body)), 403);
  const otherTask = await tokenFor([`write:sessions:${externalId}`, "trigger:tasks:other"]);
  assert.equal(await statusOf(otherTask.createSession(body)), 403);
  const both = await tokenFor([`write:sessions:${externalId}`, "trigger:tasks:agent"]);
  const created = await both.createSession(body);
  assert.equal(created.isCached, false);
  assert.equal(created.pendingVersion, false);
  // The session token it returns works like the one a secret-key create returns.
  const browser = new ApiClient(baseUrl, created.publicAccessToken, undefined, noRetry);
  assert.equal((await browser.retrieveSession(externalId)).id, created.id);
  assert.equal(await statusOf(strictClient.createSession({ ...body, externalId: `${externalId}:in` })), 422);
});

test("closing a session wakes a run waiting on `in` with the close message", async () => {
  const externalId = uniqueId("close-wakes");
  const created = await createSession(externalId);
  const { waitpointId } = await client.createSessionStreamWaitpoint(created.runId, {
    session: externalId,
    io: "in",
    timeout: "1h",
  });
  await client.closeSession(externalId, { reason: "user left" });
  const waitpoint = await settledWaitpoint(waitpointId);
  assert.equal(waitpoint.status, "COMPLETED");
  assert.deepEqual(JSON.parse(waitpoint.output), {
    kind: "message",
    payload: { chatId: externalId, trigger: "close", closedReason: "user left" },
  });
  // A run closing its own session gets no close message: it is already exiting.
  const own = uniqueId("close-own");
  const ownCreated = await createSession(own);
  // Close answers after the worker applied it: its records, if any, are already there.
  await client.closeSession(own, { callingRunId: ownCreated.runId });
  assert.deepEqual((await client.readSessionStreamRecords(own, "in")).records, []);
});

test("named side channels through sessions.open(id).channel(name)", async () => {
  const externalId = uniqueId("side");
  const created = await createSession(externalId);
  const notes = sessions.open(externalId).channel("notes");
  const { waitpointId } = await client.createSessionStreamWaitpoint(created.runId, {
    session: externalId,
    io: "in",
    timeout: "1h",
  });
  await notes.in.send({ n: 1 });
  await notes.in.send("two");
  const records = await recordsWhen(externalId, "in", 2, { channel: "notes" });
  assert.deepEqual(records.map((record) => record.seqNum), [0, 1]);
  assert.deepEqual(records.map((record) => record.data), ['{"n":1}', "two"]);
  // Its own sequence, apart from the reserved `in`; and writing it wakes no run.
  assert.deepEqual((await client.readSessionStreamRecords(externalId, "in")).records, []);
  assert.equal((await client.retrieveWaitpointToken(waitpointId)).status, "WAITING");

  // The agent writes the channel's `out`; a reader tails it with the SDK.
  for (const chunk of ["a", "b", "c"]) {
    await client.appendToSessionStream(externalId, "out", chunk, undefined, "notes");
  }
  const parts = await collect(await notes.out.read({ timeoutInSeconds: 2 }), 3, 10_000);
  assert.deepEqual(parts, ["a", "b", "c"]);
  assert.deepEqual((await client.readSessionStreamRecords(externalId, "out")).records, []);
  // Another channel of the same session is another sequence.
  await sessions.open(externalId).channel("other").in.send("elsewhere");
  assert.deepEqual((await recordsWhen(externalId, "in", 1, { channel: "other" })).map((r) => r.seqNum), [0]);

  // Scopes: `:channels:notes:in` appends there and nowhere else; `:channels:notes` reads its `out`.
  const writer = await tokenFor([`write:sessions:${externalId}:channels:notes:in`]);
  assert.equal((await writer.appendToSessionStream(externalId, "in", "typed", undefined, "notes")).ok, true);
  assert.equal(await statusOf(writer.appendToSessionStream(externalId, "in", "no")), 403);
  assert.equal(await statusOf(writer.appendToSessionStream(externalId, "in", "no", undefined, "other")), 403);
  const reader = await tokenFor([`read:sessions:${externalId}:channels:notes`]);
  const read = await reader.readSessionStreamRecords(externalId, "out", { channel: "notes" });
  assert.deepEqual(read.records.map((record) => record.data), ["a", "b", "c"]);
  assert.equal(await statusOf(reader.readSessionStreamRecords(externalId, "out")), 403);
  // Reading a channel's `in` needs the secret key, as on the reserved `in`.
  assert.equal(await statusOf(reader.readSessionStreamRecords(externalId, "in", { channel: "notes" })), 403);
  // A name outside [A-Za-z0-9._-]{1,128} is refused by the SDK, and by the server.
  assert.throws(() => sessions.open(externalId).channel("not valid"));
  const bad = await fetch(`${baseUrl}/realtime/v1/sessions/${externalId}/channels/not%20valid/in/records`, {
    headers: { Authorization: `Bearer ${secretKey}` },
  });
  assert.equal(bad.status, 400);

  // The reserved `in` still wakes the run, with its own record.
  await client.appendToSessionStream(externalId, "in", "wake up");
  const waitpoint = await settledWaitpoint(waitpointId);
  assert.equal(waitpoint.output, "wake up");
});
