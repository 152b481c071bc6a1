#!/usr/bin/env bash
# bitbucket-sim: starts the simulated bundled search server (a Data Center node uses remote search and
# must not start it).

if [ -z "$BIN_DIR" ] || [ -z "$INST_DIR" ] || [ -z "$BITBUCKET_HOME" ]; then
    echo "$0 is not intended to be run directly. Run start-bitbucket.sh instead"
    exit 1
fi

mkdir -p "$BITBUCKET_HOME/log"
PID_FILE="$BITBUCKET_HOME/log/search.pid"
if [ -f "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2> /dev/null; then
    echo "Bundled search is already running as process $(cat "$PID_FILE")"
    exit 0
fi

SEARCH_BINARY="${JAVA_BINARY:-$INST_DIR/jre/bin/bitbucket-sim}"
nohup "$SEARCH_BINARY" search --home "$BITBUCKET_HOME" --install "$INST_DIR/opensearch" \
    >> "$BITBUCKET_HOME/log/search.log" 2>&1 < /dev/null &
echo $! > "$PID_FILE"
echo "Bundled search has been started"
