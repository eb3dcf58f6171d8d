#!/bin/sh
# Create the datastore bucket and the event rule that sends every new incoming/*.pickle
# object to the writer.  Safe to run again: existing bucket and rule are left alone.
#
# Needs the MinIO client `mc` and, in the environment:
#   S3_URL         MinIO's S3 endpoint, e.g. http://minio.minio.svc.cluster.local:9000
#   S3_ACCESS_KEY  an admin (or bucket-owner) access key of that MinIO
#   S3_SECRET_KEY  its secret key
#   BUCKET         the bucket, [Bucket] name (default hisparc-datastore)
#   WEBHOOK_ARN    the writer's notification target (default arn:minio:sqs::WRITER:webhook,
#                  what MINIO_NOTIFY_WEBHOOK_*_WRITER on the MinIO server defines)
# The local compose file runs this in its one-shot minio-init service.
set -eu

: "${S3_URL:?set S3_URL to the MinIO endpoint}"
: "${S3_ACCESS_KEY:?set S3_ACCESS_KEY}"
: "${S3_SECRET_KEY:?set S3_SECRET_KEY}"
BUCKET="${BUCKET:-hisparc-datastore}"
WEBHOOK_ARN="${WEBHOOK_ARN:-arn:minio:sqs::WRITER:webhook}"

mc alias set datastore "$S3_URL" "$S3_ACCESS_KEY" "$S3_SECRET_KEY" >/dev/null
mc mb --ignore-existing "datastore/$BUCKET"

# put = s3:ObjectCreated:* (PUT, POST, copy, multipart complete).  The writer only cares
# about batches the upload function stored: incoming/<station>/<md5>.pickle.
if ! mc event add --ignore-existing --event put --prefix incoming/ --suffix .pickle \
        "datastore/$BUCKET" "$WEBHOOK_ARN"; then
    echo "mc event add failed: is the webhook target configured on the server?" >&2
    echo "The targets MinIO knows are listed by: mc admin info --json datastore" >&2
    exit 1
fi
mc event ls "datastore/$BUCKET" "$WEBHOOK_ARN"
