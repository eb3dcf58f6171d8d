"""The S3 fixture itself: a real server, reached with the production client code."""

from hisparc_datastore.storage.store import Bucket, ObjectMissing


def test_round_trip_through_real_s3(bucket: Bucket) -> None:
    etag = bucket.put("incoming/501/abc.pickle", b"payload", {"station": "501"})
    stored = bucket.get("incoming/501/abc.pickle")
    assert stored.body == b"payload"
    assert stored.etag == etag
    assert stored.metadata["station"] == "501"
    bucket.move("incoming/501/abc.pickle", "archive/2026/11/25/501/abc.pickle")
    assert [o.key for o in bucket.list("")] == ["archive/2026/11/25/501/abc.pickle"]
    try:
        bucket.get("incoming/501/abc.pickle")
    except ObjectMissing:
        pass
    else:
        raise AssertionError("moved object still readable at its old key")
