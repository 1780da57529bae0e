#!/usr/bin/env bash
# End-to-end behaviour checks of helixmq against the live RabbitMQ, through the
# `helixmq` binary only: every check exercises the broker and reports PASS or
# FAIL; the script exits non-zero if any check failed.
#
#   publish with confirm · consume (worker --exec) · priority order ·
#   retry back to the origin queue (direct, topic and fanout exchanges) ·
#   DLQ and replay · recovery after the broker closes the connections
#
# Usage: challenges/scripts/messaging_rabbitmq_challenge.sh
# Environment: RABBITMQ_HOST/PORT/USER/PASSWORD/VHOST as for helixmq (default:
# the configuration's defaults, i.e. the spec's helixagent user on localhost);
# HELIXMQ_BIN to use a given binary (default: `cargo build --release`).
# Everything runs under a unique prefix (helixagent.challenge-<random>) that is
# deleted at the end; only this script's own connections are closed.
set -uo pipefail
cd "$(dirname "$0")/../.."

BIN=${HELIXMQ_BIN:-}
if [ -z "$BIN" ]; then
  cargo build --release --quiet -p helixmq-cli || { echo "FAIL  build"; exit 1; }
  BIN=target/release/helixmq
fi
command -v python3 >/dev/null || { echo "FAIL  python3 is needed to read JSON"; exit 1; }

export RABBITMQ_HOST=${RABBITMQ_HOST:-127.0.0.1}
export HELIXMQ_PREFIX="helixagent.challenge-$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"
P=$HELIXMQ_PREFIX
WORK=$(mktemp -d)
# Fast reconnects so the recovery check does not wait the default 5 s.
printf 'rabbitmq:\n  reconnect_delay: 300ms\n' > "$WORK/challenge.yaml"
export HELIXMQ_CONFIG="$WORK/challenge.yaml"

PASSED=0
FAILED=0
PIDS=()
pass() { echo "PASS  $1"; PASSED=$((PASSED + 1)); }
fail() { echo "FAIL  $1${2:+ — $2}"; FAILED=$((FAILED + 1)); }
hx() { "$BIN" "$@"; }

cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
  hx topology delete --yes >/dev/null 2>&1 || echo "warning: could not delete the topology under $P"
  rm -rf "$WORK"
}
trap cleanup EXIT

# wait_for SECONDS COMMAND...: poll until COMMAND succeeds.
wait_for() {
  local end=$((SECONDS + $1))
  shift
  until "$@"; do
    [ "$SECONDS" -ge "$end" ] && return 1
    sleep 0.2
  done
}
lines() { [ -f "$1" ] && wc -l < "$1" || echo 0; }
at_least() { [ "$(lines "$1")" -ge "$2" ]; }

# start_worker NAME CMD ARGS...: a worker in the background; its pid in WPID.
start_worker() {
  local name=$1 cmd=$2
  shift 2
  # The binary itself, not a shell function: $! must be the worker's pid (signals, connection name).
  "$BIN" worker --exec "$cmd" "$@" > "$WORK/$name.log" 2>&1 &
  WPID=$!
  PIDS+=("$WPID")
}
# stop_worker PID: SIGTERM, the exit status of the worker.
stop_worker() {
  kill -TERM "$1" 2>/dev/null
  wait "$1"
}

# dlq_json: the DLQ as JSON (nothing removed).
dlq_json() { hx dlq list --json 2> /dev/null; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

echo "helixmq challenge on $RABBITMQ_HOST, prefix $P"

# --- 0. topology
if hx topology apply > "$WORK/apply.log" 2>&1; then
  pass "topology declared under $P"
else
  fail "topology declared" "$(cat "$WORK/apply.log")"
  exit 1
fi

# --- 1. publish with confirm
if hx publish -e "$P.tasks" -k background --payload '{"job":"resize"}' --count 200 > "$WORK/ids" 2> "$WORK/pub.err" &&
  [ "$(sort -u "$WORK/ids" | wc -l)" -eq 200 ]; then
  pass "publish with confirm: 200 distinct confirmed ids"
else
  fail "publish with confirm" "$(lines "$WORK/ids") ids; $(cat "$WORK/pub.err")"
fi

# --- 2. consume with worker --exec, graceful stop
start_worker consume 'echo "$HELIXMQ_MESSAGE_ID" >> '"$WORK/consumed" --queue "$P.tasks.background" --concurrency 8
if wait_for 60 at_least "$WORK/consumed" 200 && [ "$(sort -u "$WORK/consumed")" = "$(sort -u "$WORK/ids")" ]; then
  pass "consume: the worker processed every published id"
else
  fail "consume" "$(lines "$WORK/consumed") of 200 processed"
fi
if stop_worker "$WPID"; then pass "worker exits 0 on SIGTERM"; else fail "worker exits 0 on SIGTERM" "$(tail -3 "$WORK/consume.log")"; fi

# --- 3. priority order: published lowest first, served highest first
for p in low normal high critical; do
  hx publish -e "$P.tasks" -k llm --priority "$p" --payload "$p" --count 5 > /dev/null 2>&1 || fail "publish priority $p"
done
start_worker prio 'echo "$HELIXMQ_PRIORITY" >> '"$WORK/prio" --queue "$P.tasks.llm" --prefetch 1 --concurrency 1
if wait_for 30 at_least "$WORK/prio" 20 && sort -c -r -n "$WORK/prio" 2> /dev/null; then
  pass "priority order: served $(uniq -c "$WORK/prio" | awk '{printf "%s×%s ", $2, $1}')"
else
  fail "priority order" "served: $(tr '\n' ' ' < "$WORK/prio" 2> /dev/null)"
fi
stop_worker "$WPID"

# --- 4. retry back to the origin queue, for a queue on each exchange kind
start_worker retry '[ "$HELIXMQ_ATTEMPT" = 1 ] && exit 75; echo "$HELIXMQ_QUEUE $HELIXMQ_ATTEMPT" >> '"$WORK/retry" \
  --queue "$P.tasks.background" --queue "$P.events.debate" --queue "$P.notifications.sse" --retry-delay 1s
hx publish -e "$P.tasks" -k background --payload retry > /dev/null &&
  hx publish -e "$P.events" -k debate.round.1 --payload retry > /dev/null &&
  hx publish -e "$P.notifications" -k "" --payload retry > /dev/null || fail "publish for the retry check"
if wait_for 30 at_least "$WORK/retry" 3; then
  for q in tasks.background events.debate notifications.sse; do
    if grep -qx "$P.$q 2" "$WORK/retry"; then
      pass "retry: a failed message came back to $q after the delay (attempt 2)"
    else
      fail "retry back to $q" "$(cat "$WORK/retry")"
    fi
  done
else
  fail "retry back to origin" "only $(lines "$WORK/retry") of 3 came back: $(cat "$WORK/retry" 2> /dev/null)"
fi
stop_worker "$WPID"

# --- 5. DLQ and replay
start_worker dlq 'p=$(cat); if [ "$p" = poison ] && [ ! -f '"$WORK/fixed"' ]; then echo "bad payload: $p" >&2; exit 65; fi; echo "$HELIXMQ_MESSAGE_ID $HELIXMQ_ATTEMPT" >> '"$WORK/replayed" \
  --queue "$P.tasks.verification"
ID=$(hx publish -e "$P.tasks" -k verification --payload poison)
in_dlq() { dlq_json | grep -q "\"$ID\""; }
if wait_for 20 in_dlq; then
  reason=$(dlq_json | json "[e['reason'] for e in d if e['id']=='$ID'][0]")
  origin=$(dlq_json | json "[e['origin_queue'] for e in d if e['id']=='$ID'][0]")
  if [[ "$reason" == *"bad payload: poison"* && "$origin" == "$P.tasks.verification" ]]; then
    pass "DLQ: the poison message is there with its reason and origin queue"
  else
    fail "DLQ headers" "reason '$reason', origin '$origin'"
  fi
  before=$(dlq_json | json "len(d)")
  after=$(dlq_json | json "len(d)")
  [ "$before" = "$after" ] && pass "dlq list leaves the messages in place ($after)" || fail "dlq list is not read-only" "$before then $after"
  touch "$WORK/fixed"
  if hx dlq replay --id "$ID" > "$WORK/replay.out" 2>&1 && wait_for 20 grep -qx "$ID 1" "$WORK/replayed" &&
    [ "$(dlq_json | json "len(d)")" = 0 ]; then
    pass "replay: back to its origin with attempt 1, processed, gone from the DLQ"
  else
    fail "replay" "$(cat "$WORK/replay.out"); processed: $(cat "$WORK/replayed" 2> /dev/null)"
  fi
else
  fail "DLQ" "message $ID never reached the DLQ"
fi
stop_worker "$WPID"

# --- 6. recovery after the broker closes this script's connections
close_connections_of() { # pid → closes every connection named "helixmq pid <pid>"
  local n=0 cpid
  for cpid in $(rabbitmqctl -q list_connections pid client_properties 2> /dev/null | grep "\"helixmq pid $1\"" | cut -f1); do
    rabbitmqctl -q close_connection "$cpid" "helixmq challenge: recovery check" > /dev/null 2>&1 && n=$((n + 1))
  done
  echo "$n"
}
start_worker recover 'sleep 0.01; echo "$HELIXMQ_MESSAGE_ID" >> '"$WORK/recovered" --queue "$P.tasks.debate" --concurrency 4
hx publish -e "$P.tasks" -k debate --payload work --count 600 > "$WORK/rec_ids" 2> /dev/null || fail "publish for the recovery check"
wait_for 20 at_least "$WORK/recovered" 50
closed=$(close_connections_of "$WPID")
# Published after the close: only a recovered consumer can process these.
hx publish -e "$P.tasks" -k debate --payload late --count 100 >> "$WORK/rec_ids" 2> /dev/null || fail "publish after the close"
# Wait for every published id, not for 700 lines: the deliveries in flight at
# the close come again (duplicates), so 700 lines arrive while the last few
# ids are still in their handlers. Counting lines made this check fail with
# 695–699 "processed" and a drained queue (issue 11).
unprocessed() { comm -23 <(sort -u "$WORK/rec_ids") <(sort -u "$WORK/recovered" 2> /dev/null); }
all_recovered() { [ "$(sort -u "$WORK/rec_ids" | wc -l)" -eq 700 ] && [ -z "$(unprocessed)" ]; }
# 120 s: 700 shell handlers at concurrency 4 take ~4 s on a quiet machine but
# far longer while CI builds and tests alongside.
if [ "$closed" -ge 1 ] && wait_for 120 all_recovered && kill -0 "$WPID" 2> /dev/null; then
  dups=$(($(lines "$WORK/recovered") - $(sort -u "$WORK/recovered" | wc -l)))
  pass "consumer recovery: $closed connection(s) closed mid-run, all 700 ids processed (100 sent after the close), $dups duplicate(s)"
else
  # One snapshot, taken before the slow rabbitmqctl call, so the count and the
  # queue figures describe the same moment as closely as they can; where the
  # rest are (ready / unacked in the queue, or in a retry queue) tells a slow
  # machine from stuck deliveries.
  missing=$(unprocessed | wc -l)
  fail "consumer recovery" "closed $closed; $(sort -u "$WORK/rec_ids" | wc -l) ids confirmed, $missing never processed (e.g. $(unprocessed | head -3 | tr '\n' ' ')); queues (name ready unacked): $(rabbitmqctl -q list_queues name messages_ready messages_unacknowledged 2> /dev/null | grep "^$P" | tr '\t\n' ' ;'); worker: $(grep -iE "warn|error" "$WORK/recover.log" | tail -3 | tr '\n' ' ')"
fi
stop_worker "$WPID"

# A publisher whose connection is closed mid-run still confirms everything
# (enough messages that it is still running when rabbitmqctl gets to it).
N=100000
"$BIN" publish -e "$P.tasks" -k notifications --payload x --count "$N" > "$WORK/pub_ids" 2> "$WORK/pub_rec.err" &
PUB=$!
PIDS+=("$PUB")
closed=0
has_conn() { rabbitmqctl -q list_connections client_properties 2> /dev/null | grep -q "\"helixmq pid $PUB\""; }
if wait_for 20 has_conn; then closed=$(close_connections_of "$PUB"); fi
if wait "$PUB" && [ "$closed" -ge 1 ] && [ "$(sort -u "$WORK/pub_ids" | wc -l)" -eq "$N" ]; then
  pass "publisher recovery: connection closed mid-run, all $N publishes confirmed"
elif [ "$closed" -lt 1 ]; then
  fail "publisher recovery" "the publisher finished before its connection could be closed"
else
  fail "publisher recovery" "$(sort -u "$WORK/pub_ids" | wc -l) of $N confirmed; $(tail -c 400 "$WORK/pub_rec.err")"
fi

echo
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
