# bitbucket-sim: names the dedicated user the scripts switch to when run as root.
if [ -n "${BITBUCKET_USER}" ]; then
    return
fi

# START INSTALLER MAGIC ! DO NOT EDIT !
BITBUCKET_USER="" ##
# END INSTALLER MAGIC ! DO NOT EDIT !

export BITBUCKET_USER
