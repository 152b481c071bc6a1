#!/usr/bin/env bash
# bitbucket-sim: launches the simulated webapp, as the product's _start-webapp.sh launches the JVM.

if [ -z "$BIN_DIR" ] || [ -z "$INST_DIR" ] || [ -z "$BITBUCKET_HOME" ]; then
    echo "$0 is not intended to be run directly. Run start-bitbucket.sh instead"
    echo "To start the Bitbucket webapp without starting search, run start-bitbucket.sh --no-search"
    exit 1
fi

# Arguments for this node: the HTTP port (-Dserver.port), its name in the cluster (-Dcluster.node.name)
# and, in the simulator, how long it takes to start (-Dsim.startup.ms). Setting it here overrides
# the environment.
#
#JVM_SUPPORT_RECOMMENDED_ARGS=

if [ -z "${JVM_MINIMUM_MEMORY}" ]; then
    JVM_MINIMUM_MEMORY=512m
fi
if [ -z "${JVM_MAXIMUM_MEMORY}" ]; then
    JVM_MAXIMUM_MEMORY=1g
fi

if [ ! -d "$BITBUCKET_HOME/log" ]; then
    if ! mkdir -p "$BITBUCKET_HOME/log"; then
        echo "$BITBUCKET_HOME/log could not be created. Permissions issue?"
        echo "The Bitbucket webapp was not started"
        exit 1
    fi
fi

source "$BIN_DIR/set-jmx-opts.sh"
if [ $? -ne 0 ]; then
    exit 1
fi

if [ -z "$JAVA_BINARY" ]; then
    JAVA_BINARY="$INST_DIR/jre/bin/bitbucket-sim"
fi

PID_FILE="$BITBUCKET_HOME/log/bitbucket.pid"
if [ -f "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2> /dev/null; then
    echo "The Bitbucket webapp is already running as process $(cat "$PID_FILE")"
    exit 1
fi

BITBUCKET_ARGS="-Datlassian.standalone=BITBUCKET -Dbitbucket.home=$BITBUCKET_HOME -Dbitbucket.install=$INST_DIR"
JVM_MEMORY_ARGS="-Xms$JVM_MINIMUM_MEMORY -Xmx$JVM_MAXIMUM_MEMORY"
JAVA_OPTS="$JAVA_OPTS $BITBUCKET_ARGS $JMX_OPTS $JVM_MEMORY_ARGS $JVM_SUPPORT_RECOMMENDED_ARGS"

echo -e "\nStarting Bitbucket webapp"
if [ "$1" == "run" ]; then
    echo $$ > "$PID_FILE"
    exec "$JAVA_BINARY" node $JAVA_OPTS
else
    nohup "$JAVA_BINARY" node $JAVA_OPTS >> "$BITBUCKET_HOME/log/launcher.log" 2>&1 < /dev/null &
    echo $! > "$PID_FILE"
    if [ $? -eq 0 ]; then
        echo -e "The Bitbucket webapp has been started.\n"
    else
        rm -f "$PID_FILE"
        echo "There was a problem starting the Bitbucket webapp"
        exit 1
    fi
fi
