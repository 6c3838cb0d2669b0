// A second SDK writer process for writer.test.mjs ("two SDK processes pipe to one session's out").
// Also the writer of the worker-outage test (tests/tests/official_client.rs).
// Usage: node writer-child.mjs <externalId> <writer name> <count> [<ms between chunks>], with
// SESSIONS_API_URL and SESSIONS_SECRET_KEY set. Prints "ready", waits for a line on stdin, pipes
// <count> chunks `{writer, n}` to the session's `out` through `sessions.open(id).out.pipe`
// (5 ms every 10 chunks, or the given pause before each chunk), prints "done <lastEventId>".
// It does not call process.exit: it ends when nothing is left open.
import { createInterface } from "node:readline";
import { configure, sessions } from "@trigger.dev/sdk";

const [externalId, writer, countArg, pauseArg] = process.argv.slice(2);
const count = Number(countArg);
const pauseMs = pauseArg === undefined ? undefined : Number(pauseArg);
configure({ secretKey: process.env.SESSIONS_SECRET_KEY, baseURL: process.env.SESSIONS_API_URL });

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Paced like the parent's writer so the two overlap instead of one finishing first.
async function* chunks() {
  for (let n = 0; n < count; n++) {
    if (pauseMs !== undefined) await sleep(pauseMs);
    else if (n % 10 === 0) await sleep(5);
    yield { writer, n };
  }
}

const out = sessions.open(externalId).out;
console.log("ready");
const go = await new Promise((resolve) => {
  const lines = createInterface({ input: process.stdin });
  lines.once("line", () => {
    resolve(true);
    lines.close();
  });
  lines.once("close", () => resolve(false));
});
if (go) {
  const { lastEventId } = await out.pipe(chunks()).waitUntilComplete();
  console.log(`done ${lastEventId}`);
}
