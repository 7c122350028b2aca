#!/bin/sh
# The image's entrypoint: every service runs as a non-root user. uid 0 (MOME_UID=0 in .env, or `user: root`) is
# refused before anything starts: a root process in a container is root on the host's bind-mounted files.
if [ "$(id -u)" = 0 ]; then
    echo "mome: refusing to run as root (uid 0); set MOME_UID/MOME_GID in .env to a non-root user" >&2
    exit 78
fi
exec "$@"
