# bitbucket-sim: JMX options for the webapp; off unless JMX_REMOTE_PORT is set.
JMX_OPTS=
if [ -n "$JMX_REMOTE_PORT" ]; then
    JMX_OPTS="-Dcom.sun.management.jmxremote.port=$JMX_REMOTE_PORT"
    if [ -z "$JMX_REMOTE_AUTH" ]; then
        echo "JMX_REMOTE_PORT is set but JMX_REMOTE_AUTH is not; set it to password or ssl"
        return 1
    fi
fi
export JMX_OPTS
