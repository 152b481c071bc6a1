#!/usr/bin/env bash
# bitbucket-sim: stops the webapp whose PID the start script recorded, giving in-flight requests a
# grace period (BITBUCKET_STOP_WAIT_SECS, 60 by default) to finish. It never kills: a webapp still
# running after the grace period is reported, and the PID file kept.

if [ -z "$BITBUCKET_HOME" ]; then
    echo "$0 is not intended to be run directly. Run stop-bitbucket.sh instead"
    exit 1
fi

PID_FILE="$BITBUCKET_HOME/log/bitbucket.pid"
WAIT_SECS=${BITBUCKET_STOP_WAIT_SECS:-60}

if [ ! -f "$PID_FILE" ]; then
    echo "The Bitbucket webapp is not running: no PID file at $PID_FILE"
    exit 0
fi

PID=$(cat "$PID_FILE")
if [ -z "$PID" ] || ! kill -0 "$PID" 2> /dev/null; then
    echo "The Bitbucket webapp (PID '$PID') is not running; removing the stale PID file"
    rm -f "$PID_FILE"
    exit 0
fi

echo "Stopping the Bitbucket webapp (PID $PID); waiting up to $WAIT_SECS seconds for it to finish"
kill -TERM "$PID"
DEADLINE=$((SECONDS + WAIT_SECS))
while kill -0 "$PID" 2> /dev/null; do
    if [ $SECONDS -ge $DEADLINE ]; then
        echo "The Bitbucket webapp (PID $PID) did not stop within $WAIT_SECS seconds; it is still running"
        exit 1
    fi
    sleep 0.1
done

rm -f "$PID_FILE"
echo "The Bitbucket webapp has been stopped"
