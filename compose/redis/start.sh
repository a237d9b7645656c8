#!/bin/sh
# Start redis-server with qworker's settings (redis.conf) and ACL users (users.acl). Each
# user's password comes from the environment and only its SHA-256 is written to the ACL
# file: QWORKER_PRODUCER_PASSWORD, QWORKER_WORKER_PASSWORD, QWORKER_ADMIN_PASSWORD.
# Extra arguments go to redis-server (the tests pass --port, --dir, --bind).
set -eu
here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
conf=${QWORKER_REDIS_CONF:-$here/redis.conf}
template=${QWORKER_ACL_TEMPLATE:-$here/users.acl}
aclfile=${QWORKER_ACL_FILE:-/tmp/qworker-users.acl}

edits=""
for role in PRODUCER WORKER ADMIN; do
    var="QWORKER_${role}_PASSWORD"
    eval "password=\${$var:-}"
    if [ -z "$password" ]; then
        echo "start.sh: $var is not set: copy compose/.env.example to compose/.env and fill it in" >&2
        exit 1
    fi
    hash=$(printf '%s' "$password" | sha256sum | cut -d ' ' -f 1)
    edits="${edits}s/{${var}:sha256}/${hash}/;"
done
umask 077
sed -e "$edits" "$template" > "$aclfile"
exec redis-server "$conf" --aclfile "$aclfile" "$@"
