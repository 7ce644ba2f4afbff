"""S3 outages: transient errors are retried with backoff up to a limit, then fail naming what was being done."""

from __future__ import annotations

import time

import pytest

from cpt import storage


def test_an_outage_shorter_than_the_limit_is_ridden_out(moto, s3_bucket, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv(storage.RETRY_ENV, "60")
    url = f"{s3_bucket}/a/blob.bin"
    payload = bytes(range(256)) * 4096
    storage.write_bytes(url, payload)
    t0 = time.monotonic()
    restart = moto.outage(3.0)
    with caplog.at_level("WARNING"):
        storage.download_file(url, str(tmp_path / "blob.bin"))
        storage.write_bytes(f"{s3_bucket}/a/after.bin", b"ok")
    restart.join()
    assert time.monotonic() - t0 >= 3.0
    assert (tmp_path / "blob.bin").read_bytes() == payload
    assert storage.read_bytes(f"{s3_bucket}/a/after.bin") == b"ok"
    assert f"cannot download {url}" in caplog.text and "retrying in" in caplog.text


def test_an_outage_longer_than_the_limit_fails_clearly(moto, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.RETRY_ENV, "2")
    src = tmp_path / "ckpt.pt"
    src.write_bytes(b"x" * 1000)
    storage.upload_file(str(src), f"{s3_bucket}/run/good.pt")
    restart = moto.outage(6.0)
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError, match=r"cannot upload .*ckpt.pt to s3://.*/run/new.pt: S3 unreachable"):
        storage.upload_file(str(src), f"{s3_bucket}/run/new.pt")
    assert 2.0 <= time.monotonic() - t0 < 6.0
    restart.join()
    assert storage.read_bytes(f"{s3_bucket}/run/good.pt") == b"x" * 1000  # what was there is untouched
    assert not storage.exists(f"{s3_bucket}/run/new.pt")


def test_a_missing_object_fails_at_once(s3_bucket, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError, match=r"cannot download s3://.*/nope.pt"):
        storage.download_file(f"{s3_bucket}/nope.pt", str(tmp_path / "x"))
    assert time.monotonic() - t0 < 5
