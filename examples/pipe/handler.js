#!/usr/bin/env node
// A `helixmq worker --pipe` handler: one JSON line in per message, one out.
const readline = require("readline");

function handle(msg) {
  let job;
  try { job = JSON.parse(msg.payload ?? ""); } catch (e) {
    return { outcome: "dead_letter", reason: `payload is not JSON: ${e.message}` };
  }
  if (job && job.flaky && msg.attempt < 2) {
    return { outcome: "retry", delay_ms: 1000, reason: "flaky, first attempt" };
  }
  // ... the real work on `job` goes here ...
  return { outcome: "ack" };
}

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  process.stdout.write(JSON.stringify(handle(JSON.parse(line))) + "\n");
});
