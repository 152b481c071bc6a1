#!/usr/bin/env bash
# A private PostgreSQL instance for the shared-journal tests: its own data directory and unix socket
# under target/ (no TCP listener), trust authentication, started and stopped by this script.
#   pg-test-instance.sh start   # prints the URL (BBUPGRADE_TEST_PG_URL) on stdout; idempotent
#   pg-test-instance.sh stop
#   pg-test-instance.sh url
# PGTEST_DIR overrides the directory (default: <workspace>/target/pg-test), PGTEST_PORT the port
# that names the socket (default 54329). Run as root, the server runs as user `postgres`.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
dir="${PGTEST_DIR:-$root/target/pg-test}"
port="${PGTEST_PORT:-54329}"
data="$dir/data"
sock="$dir/sock"
log="$dir/server.log"

bindir=""
for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && bindir="$d"
done
if [ -z "$bindir" ] && command -v initdb >/dev/null 2>&1; then
    bindir="$(dirname "$(command -v initdb)")"
fi

url() {
    echo "postgresql://postgres@/postgres?host=$sock&port=$port"
}

as_pg() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

case "${1:-}" in
start)
    if [ -z "$bindir" ]; then
        echo "PostgreSQL is not installed (no initdb); install it with: apt-get install -y postgresql" >&2
        exit 3
    fi
    mkdir -p "$dir" "$sock"
    if [ "$(id -u)" -eq 0 ]; then
        chown postgres: "$dir" "$sock"
        # The server must be able to reach its directory through the workspace's parents.
        chmod o+x "$root" "$root/target" 2>/dev/null || true
    fi
    if [ ! -f "$data/PG_VERSION" ]; then
        as_pg "$bindir/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 || {
            cat "$dir/initdb.log" >&2
            exit 1
        }
    fi
    if ! as_pg "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        as_pg "$bindir/pg_ctl" -D "$data" -l "$log" -w -t 60 \
            -o "-p $port -k $sock -c listen_addresses='' -c max_connections=200 -c fsync=off" \
            start >/dev/null || {
            tail -n 30 "$log" >&2
            exit 1
        }
    fi
    url
    ;;
stop)
    if [ -n "$bindir" ] && [ -f "$data/PG_VERSION" ]; then
        as_pg "$bindir/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    ;;
url)
    url
    ;;
*)
    echo "usage: $0 start|stop|url" >&2
    exit 2
    ;;
esac
