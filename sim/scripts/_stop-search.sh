#!/usr/bin/env bash
# bitbucket-sim: stops the simulated bundled search server, if its start script recorded one.

if [ -z "$BITBUCKET_HOME" ]; then
    echo "$0 is not intended to be run directly. Run stop-bitbucket.sh instead"
    exit 1
fi

PID_FILE="$BITBUCKET_HOME/log/search.pid"
if [ ! -f "$PID_FILE" ]; then
    exit 0
fi

PID=$(cat "$PID_FILE")
if [ -n "$PID" ] && kill -0 "$PID" 2> /dev/null; then
    kill -TERM "$PID"
    for _ in $(seq 1 100); do
        kill -0 "$PID" 2> /dev/null || break
        sleep 0.1
    done
fi
rm -f "$PID_FILE"
echo "Bundled search has been stopped"
