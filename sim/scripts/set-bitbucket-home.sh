# bitbucket-sim: sets BITBUCKET_HOME, the node's home directory, as the product's script does.
# One way to set the BITBUCKET_HOME path is here via this variable: set a valid path like
# /var/atlassian/application-data/bitbucket. Setting it in the environment works too.
#
if [ -z "$BITBUCKET_HOME" ]; then
    BITBUCKET_HOME=
fi

if [ -z "$BITBUCKET_HOME" ]; then
    echo "Bitbucket doesn't know where to store its data. Configure the BITBUCKET_HOME"
    echo "environment variable with the directory where Bitbucket should store its data,"
    echo "or set it in set-bitbucket-home.sh."
    return 1
fi

case "$BITBUCKET_HOME" in
    *" "*)
        echo "BITBUCKET_HOME '$BITBUCKET_HOME' contains spaces, which is not supported."
        echo "Set BITBUCKET_HOME to a directory which does not contain spaces."
        return 1
        ;;
esac

export BITBUCKET_HOME
