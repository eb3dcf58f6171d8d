#!/bin/sh
# Protect the datastore bucket against deletes and overwrites: versioning on, and a
# lifecycle that ends old versions, but never a current object under archive/, the copy
# `datastore replay` rebuilds day files from.  Safe to run again: it replaces the bucket's
# lifecycle rules with the ones below (so keep other rules out of this bucket).
#
# Needs the MinIO client `mc` and, in the environment:
#   S3_URL, S3_ACCESS_KEY, S3_SECRET_KEY, BUCKET   as for setup-notifications.sh
#   ARCHIVE_KEEP_DAYS  days a deleted or overwritten archive/ object stays restorable
#                      (default 90)
#   SCRATCH_KEEP_DAYS  the same for every other prefix (default 1): each move of the
#                      writer leaves a delete marker and an old version under incoming/,
#                      which listings of incoming/ (the sweep's) step over until they go
# The local compose file runs this after setup-notifications.sh in minio-init.
set -eu

: "${S3_URL:?set S3_URL to the MinIO endpoint}"
: "${S3_ACCESS_KEY:?set S3_ACCESS_KEY}"
: "${S3_SECRET_KEY:?set S3_SECRET_KEY}"
BUCKET="${BUCKET:-hisparc-datastore}"
ARCHIVE_KEEP_DAYS="${ARCHIVE_KEEP_DAYS:-90}"
SCRATCH_KEEP_DAYS="${SCRATCH_KEEP_DAYS:-1}"

mc alias set datastore "$S3_URL" "$S3_ACCESS_KEY" "$S3_SECRET_KEY" >/dev/null
target="datastore/$BUCKET"

# A delete then leaves a delete marker and keeps the data as a noncurrent version; an
# overwrite keeps the old bytes the same way.  Both can be undone until the rules below
# expire the old version.
mc version enable "$target"

# Only noncurrent versions expire: no rule has --expire-days, so no current object ever
# does.  Expired delete markers (the marker left alone once its old versions are gone)
# are removed too, so listings of the busy prefixes stay short.
mc ilm rule rm --all --force "$target" >/dev/null 2>&1 || true
mc ilm rule add --prefix archive/ --noncurrent-expire-days "$ARCHIVE_KEEP_DAYS" "$target"
for prefix in incoming/ deferred/ retrying/ failed/ suspicious/ legacy-import/; do
    mc ilm rule add --prefix "$prefix" --noncurrent-expire-days "$SCRATCH_KEEP_DAYS" \
        --expire-delete-marker "$target"
done
mc version info "$target"
mc ilm rule ls "$target"
