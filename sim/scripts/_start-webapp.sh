#!/usr/bin/env bash
# bitbucket-sim: launches the simulated webapp, as the product's _start-webapp.sh launches the JVM.

if [ -z "$BIN_DIR" ] || [ -z "$INST_DIR" ] || [ -z "$BITBUCKET_HOME" ]; then
    echo "$0 is not intended to be run directly. Run start-bitbucket.sh instead"
    echo "To start the Bitbucket webapp without starting search, run start-bitbucket.sh --no-search"
    exit 1
fi

# Arguments for this node: the HTTP port (-Dserver.port) and address (-Dserver.address), its name
# in the cluster (-Dcluster.node.name; "Not configured" without it), its cluster (Hazelcast) port
# (-Dhazelcast.port) and, in the simulator, how long it takes to start (-Dsim.startup.ms) and the
# simulator's own handle on it (-Dsim.node.label). Setting it here overrides the environment.
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

# As in the product, nothing here checks for a webapp that already runs: a second start launches a
# second process (which cannot bind the port and exits) and overwrites the PID file.
PID_FILE="$BITBUCKET_HOME/log/bitbucket.pid"

BITBUCKET_ARGS="-Datlassian.standalone=BITBUCKET -Dbitbucket.home=$BITBUCKET_HOME -Dbitbucket.install=$INST_DIR"
JVM_MEMORY_ARGS="-Xms$JVM_MINIMUM_MEMORY -Xmx$JVM_MAXIMUM_MEMORY"
JAVA_OPTS="$JAVA_OPTS $BITBUCKET_ARGS $JMX_OPTS $JVM_MEMORY_ARGS $JVM_SUPPORT_RECOMMENDED_ARGS"

echo -e "\nStarting Bitbucket webapp"
if [ "$1" == "run" ]; then
    # In the foreground, as a child of this shell (no exec) and without a PID file: whoever runs
    # it (a service manager) tracks the process itself.
    "$JAVA_BINARY" node $JAVA_OPTS
else
    nohup "$JAVA_BINARY" node $JAVA_OPTS >> "$BITBUCKET_HOME/log/launcher.log" 2>&1 < /dev/null &
    echo $! > "$PID_FILE"
    if [ $? -eq 0 ]; then
        echo -e "The Bitbucket webapp has been started.\n"
    else
        rm -f "$PID_FILE"
        echo "There was a problem starting the Bitbucket webapp"
    fi
fi
