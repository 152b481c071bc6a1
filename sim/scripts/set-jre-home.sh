# bitbucket-sim: points JRE_HOME at the bundled runtime, as the installer does. In the simulator the
# "JVM" is the bitbucket-sim program in jre/bin.
JRE_HOME="$INST_DIR/jre"

if [ ! -x "$JRE_HOME/bin/bitbucket-sim" ]; then
    echo "The bundled runtime is missing: '$JRE_HOME/bin/bitbucket-sim' is not an executable program."
    echo "Edit set-jre-home.sh and set JRE_HOME to a runtime that holds bin/bitbucket-sim"
    return 1
fi

JAVA_BINARY="$JRE_HOME/bin/bitbucket-sim"
JAVA_HOME=$JRE_HOME

export JRE_HOME
export JAVA_HOME
export JAVA_BINARY
