#!/bin/bash
# Initialise an empty data folder the way the official postgres image does, then run the server.
set -euo pipefail

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set}"
    user="${POSTGRES_USER:-postgres}"
    initdb --username="$user" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") \
        --auth-local=trust --auth-host=scram-sha-256 -D "$PGDATA"
    printf 'host all all all scram-sha-256\n' >> "$PGDATA/pg_hba.conf"
    # The init scripts talk to a server that listens on the local socket only.
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start
    for script in /docker-entrypoint-initdb.d/*.sh; do
        [ -e "$script" ] || continue
        echo "running $script"
        POSTGRES_USER="$user" bash "$script"
    done
    pg_ctl -D "$PGDATA" -m fast -w stop
fi

exec "$@" -c listen_addresses='*'
