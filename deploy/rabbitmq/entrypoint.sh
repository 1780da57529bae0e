#!/bin/bash
# deploy/rabbitmq/entrypoint.sh — container entrypoint for the helixmq RabbitMQ
# services of docker-compose.messaging.yml and docker-compose.prod.yml.
#
# Why: configs/rabbitmq/definitions.json (generated from the code) holds the
# topology and the user's permissions but, by design, no user and no password.
# A node that loads definitions at boot does not create its default user
# either, and RabbitMQ refuses to import permissions for a user that does not
# exist. So at each start this script writes the user from the environment as
# a definitions file with RabbitMQ's salted SHA-256 password hash, next to a copy
# of the topology, into DEFS_DIR (rabbitmq.conf: `load_definitions = DEFS_DIR`;
# files there are imported in name order: users first).
#
# Environment:
#   RABBITMQ_USER (default helixagent), RABBITMQ_PASSWORD (required),
#   RABBITMQ_USER_TAGS (default management),
#   HELIXMQ_DEFINITIONS (default /etc/rabbitmq/definitions.json),
#   DEFS_DIR (default /var/lib/rabbitmq/definitions.d).
# Arguments: the command to run after that (default: the image's entrypoint
# with rabbitmq-server). With HELIXMQ_DEFS_ONLY=1 it only writes the files
# (used by the repository's tests).
set -euo pipefail

user=${RABBITMQ_USER:-helixagent}
password=${RABBITMQ_PASSWORD:?RABBITMQ_PASSWORD must be set (the password of ${user})}
tags=${RABBITMQ_USER_TAGS:-management}
defs=${HELIXMQ_DEFINITIONS:-/etc/rabbitmq/definitions.json}
dir=${DEFS_DIR:-/var/lib/rabbitmq/definitions.d}

[[ $user =~ ^[A-Za-z0-9._@-]+$ ]] || { echo "entrypoint: RABBITMQ_USER '$user' has unsupported characters" >&2; exit 2; }
[[ $tags =~ ^[a-z_,]*$ ]] || { echo "entrypoint: RABBITMQ_USER_TAGS '$tags' is not a comma-separated tag list" >&2; exit 2; }
[[ -f $defs ]] || { echo "entrypoint: definitions file $defs is missing (mount configs/rabbitmq/definitions.json)" >&2; exit 2; }

mkdir -p "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# rabbit_password_hashing_sha256: base64(salt ++ sha256(salt ++ password)), 4-byte salt.
head -c 4 /dev/urandom >"$tmp/salt"
{ cat "$tmp/salt"; printf '%s' "$password"; } | sha256sum | cut -d' ' -f1 >"$tmp/hex"
printf '%b' "$(sed 's/../\\x&/g' "$tmp/hex")" >"$tmp/digest"
hash=$(cat "$tmp/salt" "$tmp/digest" | base64 -w0)

tag_json=$(printf '%s' "$tags" | tr ',' '\n' | sed '/^$/d; s/.*/"&"/' | paste -sd, -)
umask 077
cat >"$dir/00-users.json" <<JSON
{"users":[{"name":"$user","password_hash":"$hash","hashing_algorithm":"rabbit_password_hashing_sha256","tags":[${tag_json}],"limits":{}}]}
JSON
cp "$defs" "$dir/10-topology.json"
# The server runs as `rabbitmq`; the files are private to it (a password hash is still a secret).
if [[ $(id -u) == 0 ]] && id rabbitmq >/dev/null 2>&1; then chown -R rabbitmq:rabbitmq "$dir"; fi
echo "entrypoint: definitions for user '$user' written to $dir"

[[ ${HELIXMQ_DEFS_ONLY:-0} == 1 ]] && exit 0
if [[ $# -eq 0 ]]; then set -- rabbitmq-server; fi
exec docker-entrypoint.sh "$@"
