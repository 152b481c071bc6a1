#!/usr/bin/env bash
# bitbucket-sim: stops the simulated Bitbucket webapp, then the bundled search, behaving like the
# product's stop-bitbucket.sh: arguments are ignored, and the exit status is that of the last step
# (stopping search), so a webapp that did not stop does not show in it.

# Follow links to this script: BIN_DIR is the directory the script really is in.
SELF="$0"
while [ -h "$SELF" ]; do
    TARGET=$(readlink "$SELF")
    case "$TARGET" in
        /*) SELF="$TARGET" ;;
        *) SELF="$(dirname "$SELF")/$TARGET" ;;
    esac
done

export BIN_DIR=$(dirname "$SELF")
export INST_DIR=$(dirname "$BIN_DIR")

source "$BIN_DIR/set-bitbucket-home.sh" &&
    source "$BIN_DIR/set-bitbucket-user.sh"
if [ -z "$BITBUCKET_HOME" ]; then
    echo "Required environment variables were not set."
    exit 1
fi

if [ -z "$BITBUCKET_USER" ] || [ "$(id -un)" == "$BITBUCKET_USER" ]; then
    echo "Stopping Atlassian Bitbucket as the current user"
    # The webapp first, then search; each stop script relies on the PID file of its start script.
    "$BIN_DIR/_stop-webapp.sh"
    "$BIN_DIR/_stop-search.sh"
elif [ "$(id -u)" -ne 0 ]; then
    echo "Atlassian Bitbucket has been installed to run as $BITBUCKET_USER, and can only be stopped by that"
    echo "user. Use \"sudo -u $BITBUCKET_USER $0\" to stop Bitbucket."
    exit 1
else
    echo "Stopping Atlassian Bitbucket as dedicated user $BITBUCKET_USER"
    if [ -x "/sbin/runuser" ]; then
        SU="/sbin/runuser"
    else
        SU="su"
    fi
    $SU -l "$BITBUCKET_USER" <<EOS
export BITBUCKET_HOME="$BITBUCKET_HOME"
export BIN_DIR="$BIN_DIR"
export INST_DIR="$INST_DIR"
export BITBUCKET_STOP_WAIT_SECS="$BITBUCKET_STOP_WAIT_SECS"
cd "$PWD"
"$BIN_DIR/_stop-webapp.sh"
"$BIN_DIR/_stop-search.sh"
EOS
fi
