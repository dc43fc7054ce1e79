#!/bin/sh
# Every secret docker compose needs, generated once into an env file only you can read:
#
#   make secrets                    # = sh deploy/secrets.sh .env (compose reads ./.env itself)
#   sh deploy/secrets.sh FILE       # elsewhere; then: docker compose --env-file FILE up
#
# A value already in the file is kept, so running it again after an upgrade adds only the new
# secrets. Rotate one by deleting its line, running this again, then `docker compose up -d`
# (the migrate job sets the new database passwords; see README, Security).
set -eu
file=${1:-.env}
umask 077
touch "$file"
chmod 600 "$file"
for name in \
    POSTGRES_PASSWORD \
    PFLEA_OWNER_DB_PASSWORD PFLEA_INGESTER_DB_PASSWORD PFLEA_WRITER_DB_PASSWORD \
    PFLEA_PROJECTOR_DB_PASSWORD PFLEA_READER_DB_PASSWORD \
    INGESTER_NATS_PASSWORD WRITER_NATS_PASSWORD PROJECTOR_NATS_PASSWORD \
    OPERATOR_NATS_PASSWORD WEB_NATS_PASSWORD ADMIN_NATS_PASSWORD PFLEA_WEB_OPERATOR_TOKEN \
    GRAFANA_ADMIN_PASSWORD
do
    if ! grep -q "^$name=" "$file"; then
        # 'p' + 36 hex digits: URL-safe (it travels inside DATABASE_URL and NATS_URL) and
        # starting with a letter (NATS reads a leading digit as a number).
        printf '%s=p%s\n' "$name" "$(od -An -N18 -tx1 /dev/urandom | tr -d ' \n')" >> "$file"
    fi
done
echo "secrets in $file (readable by you only)"
