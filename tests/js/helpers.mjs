// What both official-client suites share (sessions.test.mjs, writer.test.mjs): the service's
// address and key from SESSIONS_API_URL and SESSIONS_SECRET_KEY, the official ApiClient, the SDK
// configured against the same server, and small helpers. Not a test file itself.
import assert from "node:assert/strict";
import { ApiClient } from "@trigger.dev/core/v3";
import { configure } from "@trigger.dev/sdk";

export const baseUrl = process.env.SESSIONS_API_URL;
export const secretKey = process.env.SESSIONS_SECRET_KEY;
assert.ok(baseUrl && secretKey, "SESSIONS_API_URL and SESSIONS_SECRET_KEY must be set");
export const client = new ApiClient(baseUrl, secretKey);
// The SDK's `sessions` API (`sessions.open(id)…`) talks to the same server.
configure({ secretKey, baseURL: baseUrl });

export const uniqueId = (label) => `${label}-${Date.now()}-${Math.random().toString(36).slice(2)}`;
export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export async function createSession(externalId) {
  return client.createSession({
    type: "chat.agent",
    externalId,
    taskIdentifier: "agent",
    triggerConfig: { basePayload: { chatId: externalId } },
  });
}

/** Reads a stream's parts until `count` arrived, it ended, or `timeoutMs` passed. */
export async function collect(stream, count, timeoutMs = 20_000) {
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

/** The records route's answer once `done(records)` holds (or as it is after 20 s). */
export async function recordsUntil(externalId, io, done, options = {}) {
  const deadline = Date.now() + 20_000;
  for (;;) {
    const { records } = await client.readSessionStreamRecords(externalId, io, options);
    if (done(records) || Date.now() > deadline) return records;
    await sleep(100);
  }
}

/** The records route's answer once it lists at least `count` records (or after 20 s). */
export const recordsWhen = (externalId, io, count, options) =>
  recordsUntil(externalId, io, (records) => records.length >= count, options);
