#!/usr/bin/env python3
"""A `helixmq worker --pipe` handler: one JSON line in per message, one out."""
import json
import sys


def handle(msg):
    try:
        job = json.loads(msg.get("payload", ""))
    except ValueError as e:
        return {"outcome": "dead_letter", "reason": f"payload is not JSON: {e}"}
    if isinstance(job, dict) and job.get("flaky") and msg["attempt"] < 2:
        return {"outcome": "retry", "delay_ms": 1000, "reason": "flaky, first attempt"}
    # ... the real work on `job` goes here ...
    return {"outcome": "ack"}


for line in sys.stdin:
    print(json.dumps(handle(json.loads(line))), flush=True)
