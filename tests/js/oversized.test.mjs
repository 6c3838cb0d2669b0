// Bodies over the limit, sent with Node's own fetch (undici, as the official client uses it):
// every one must be answered 413 with the JSON error body and the CORS headers, never end in a
// network error (EPIPE / ECONNRESET), which the official client would retry.
// Started by tests/tests/oversized_bodies.rs with SESSIONS_API_URL and SESSIONS_SECRET_KEY.
import { test } from "node:test";
import assert from "node:assert/strict";

const baseUrl = process.env.SESSIONS_API_URL;
const secretKey = process.env.SESSIONS_SECRET_KEY;
assert.ok(baseUrl && secretKey, "SESSIONS_API_URL and SESSIONS_SECRET_KEY must be set");

const MIB = 1024 * 1024;
const ORIGIN = "http://app.example.test";
const uniqueId = (label) => `${label}-${Date.now()}-${Math.random().toString(36).slice(2)}`;

async function createSession(externalId) {
  const response = await fetch(`${baseUrl}/api/v1/sessions`, {
    method: "POST",
    headers: { authorization: `Bearer ${secretKey}`, "content-type": "application/json" },
    body: JSON.stringify({
      type: "chat.agent",
      externalId,
      taskIdentifier: "agent",
      triggerConfig: { basePayload: {} },
    }),
  });
  assert.equal(response.status, 201);
  return response.json();
}

/// What is wrong with the answer to one oversized request (null: a proper 413).
async function judge(send) {
  let response;
  try {
    response = await send();
  } catch (error) {
    const cause = error.cause ? ` (${error.cause.code ?? error.cause.message})` : "";
    return `network error: ${error.message}${cause}`;
  }
  let text;
  try {
    text = await response.text();
  } catch (error) {
    return `${response.status}, body unreadable: ${error.cause?.code ?? error.message}`;
  }
  if (response.status !== 413) return `status ${response.status}: ${text.slice(0, 200)}`;
  if (response.headers.get("access-control-allow-origin") !== "*") {
    return "no access-control-allow-origin header";
  }
  if (!(response.headers.get("content-type") ?? "").startsWith("application/json")) {
    return `content-type ${response.headers.get("content-type")}`;
  }
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    return `not JSON: ${text.slice(0, 200)}`;
  }
  if (typeof body.error !== "string" || body.error.length === 0) {
    return `no error message: ${text.slice(0, 200)}`;
  }
  return null;
}

/// Sends `times` requests one after the other; prints and returns the failures.
async function sendMany(label, times, send) {
  const failures = [];
  for (let attempt = 0; attempt < times; attempt += 1) {
    const problem = await judge(send);
    if (problem) failures.push(`${label} #${attempt}: ${problem}`);
  }
  console.log(`${label}: ${times - failures.length} of ${times} answered 413 with JSON and CORS`);
  for (const failure of failures) console.log(`  ${failure}`);
  return failures;
}

test("appends of 1 MiB + 1 byte and of 8 MiB are answered 413, 50 times each", async () => {
  const externalId = uniqueId("oversized");
  await createSession(externalId);
  const url = `${baseUrl}/realtime/v1/sessions/${externalId}/in/append`;
  const headers = {
    authorization: `Bearer ${secretKey}`,
    "content-type": "text/plain",
    origin: ORIGIN,
  };
  const justOver = "x".repeat(MIB + 1);
  const eight = "y".repeat(8 * MIB);
  const failures = [
    ...(await sendMany("append 1 MiB + 1", 50, () =>
      fetch(url, { method: "POST", headers, body: justOver }),
    )),
    ...(await sendMany("append 8 MiB", 50, () => fetch(url, { method: "POST", headers, body: eight }))),
  ];
  console.log(`append: ${100 - failures.length} of 100 answered 413`);
  assert.equal(failures.length, 0, failures.join("\n"));
  // The same client (and its pooled connections) still appends normally.
  const ok = await fetch(url, { method: "POST", headers, body: "after the refusals" });
  assert.equal(ok.status, 200);
});

test("JSON routes and snapshot blobs answer 413 the same way", async () => {
  const externalId = uniqueId("oversized-json");
  const session = await createSession(externalId);
  const auth = { authorization: `Bearer ${secretKey}`, origin: ORIGIN };
  const json = { ...auth, "content-type": "application/json" };
  const eight = `{"padding":"${"z".repeat(8 * MIB)}"}`;
  const snapshotUrl = async () => {
    const response = await fetch(`${baseUrl}/api/v1/sessions/${externalId}/snapshot-url`, {
      method: "PUT",
      headers: auth,
    });
    assert.equal(response.status, 200);
    return (await response.json()).presignedUrl;
  };
  const putUrl = await snapshotUrl();
  // Over SESSIONS_MAX_SNAPSHOT_BYTES (10 MiB by default).
  const snapshot = new Uint8Array(10 * MIB + 1);
  // A streamed body has no content-length: refused after the JSON limit was read.
  const streamed = () =>
    new ReadableStream({
      start(controller) {
        for (let chunk = 0; chunk < 32; chunk += 1) controller.enqueue(new Uint8Array(64 * 1024));
        controller.close();
      },
    });
  const failures = [
    ...(await sendMany("create session 8 MiB", 10, () =>
      fetch(`${baseUrl}/api/v1/sessions`, { method: "POST", headers: json, body: eight }),
    )),
    ...(await sendMany("close 8 MiB", 10, () =>
      fetch(`${baseUrl}/api/v1/sessions/${externalId}/close`, {
        method: "POST",
        headers: json,
        body: eight,
      }),
    )),
    ...(await sendMany("wait 8 MiB", 10, () =>
      fetch(`${baseUrl}/api/v1/runs/${session.runId}/session-streams/wait`, {
        method: "POST",
        headers: json,
        body: eight,
      }),
    )),
    ...(await sendMany("create session, streamed 2 MiB", 10, () =>
      fetch(`${baseUrl}/api/v1/sessions`, {
        method: "POST",
        headers: json,
        body: streamed(),
        duplex: "half",
      }),
    )),
    ...(await sendMany("snapshot 10 MiB + 1", 10, () =>
      fetch(putUrl, { method: "PUT", headers: { origin: ORIGIN }, body: snapshot }),
    )),
  ];
  assert.equal(failures.length, 0, failures.join("\n"));
});
