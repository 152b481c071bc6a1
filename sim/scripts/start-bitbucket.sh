#!/usr/bin/env bash
# bitbucket-sim: starts the simulated Bitbucket webapp (and the bundled search unless told not to),
# behaving like the product's start-bitbucket.sh:
# - arguments: -ns|--no-search and -fg|run; anything else is refused with exit status 1;
# - BIN_DIR is the directory of $0 as it was invoked: a link to this script is not followed for it;
# - there is no check for a node that already runs (that is left to whoever calls this script);
# - the exit status is that of the last step (0 unless search had to be stopped after a run in the
#   foreground), not whether the webapp started.

while [[ $# -gt 0 ]]; do
    case "$1" in
        -ns|--no-search)
            NO_SEARCH=1
            ;;
        -fg|run)
            RUN=1
            ;;
        *)
            echo "Unsupported argument: $1"
            exit 1
            ;;
    esac
    shift
done

pushd "$(dirname "$0")" > /dev/null
BIN_DIR=$(pwd)
popd > /dev/null
export BIN_DIR
export INST_DIR=$(dirname "$BIN_DIR")

source "$BIN_DIR/set-jre-home.sh" &&
    source "$BIN_DIR/set-bitbucket-home.sh" &&
    source "$BIN_DIR/set-bitbucket-user.sh"
if [ $? -ne 0 ]; then
    echo -e "\nStartup has been aborted"
    exit 1
fi

if [ "$RUN" = "1" ]; then
    LAUNCH_CMD=run
else
    LAUNCH_CMD=start
fi

if [ -z "$BITBUCKET_USER" ] || [ "$(id -un)" == "$BITBUCKET_USER" ]; then
    echo "Starting Atlassian Bitbucket as the current user"
    if [ -z "$NO_SEARCH" ]; then
        "$BIN_DIR/_start-search.sh"
    fi
    "$BIN_DIR/_start-webapp.sh" $LAUNCH_CMD
    if [ -z "$NO_SEARCH" ] && [ "$LAUNCH_CMD" = "run" ]; then
        "$BIN_DIR/_stop-search.sh"
    fi
elif [ "$(id -u)" -ne 0 ]; then
    echo "Atlassian Bitbucket has been installed to run as $BITBUCKET_USER. Use \"sudo -u $BITBUCKET_USER $0\""
    echo "to start as that user."
    exit 1
else
    echo "Starting Atlassian Bitbucket as dedicated user $BITBUCKET_USER"
    if [ -x "/sbin/runuser" ]; then
        SU="/sbin/runuser"
    else
        SU="su"
    fi
    $SU -l "$BITBUCKET_USER" <<EOS
export BIN_DIR="$BIN_DIR"
export INST_DIR="$INST_DIR"
export BITBUCKET_HOME="$BITBUCKET_HOME"
export JRE_HOME="$JRE_HOME"
export JAVA_BINARY="$JAVA_BINARY"
export JVM_MAXIMUM_MEMORY="$JVM_MAXIMUM_MEMORY"
export JVM_MINIMUM_MEMORY="$JVM_MINIMUM_MEMORY"
export JVM_SUPPORT_RECOMMENDED_ARGS="$JVM_SUPPORT_RECOMMENDED_ARGS"
export LANG="$LANG"
cd "$PWD"
if [ -z "$NO_SEARCH" ]; then
    "$BIN_DIR/_start-search.sh"
fi
"$BIN_DIR/_start-webapp.sh" $LAUNCH_CMD
if [ -z "$NO_SEARCH" ] && [ "$LAUNCH_CMD" = "run" ]; then
    "$BIN_DIR/_stop-search.sh"
fi
EOS
fi
