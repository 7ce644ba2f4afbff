"""S3 outages: transient errors are retried with backoff up to a limit, then fail naming what was being done."""

from __future__ import annotations

import time

import pytest

from cpt.io import storage


def test_an_outage_shorter_than_the_limit_is_ridden_out(moto, s3_bucket, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(storage, "_retry_s", 60.0)
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
    monkeypatch.setattr(storage, "_retry_s", 2.0)
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


# Connections dropped in the middle of a transfer (``CuttingProxy``): the bytes that arrive are the object's.


def _payload(n: int) -> bytes:
    import random

    return random.Random(n).randbytes(n)


def test_a_read_cut_mid_transfer_resumes_from_the_byte_it_reached(cutting_proxy, s3_bucket, tmp_path, caplog):
    url = f"{s3_bucket}/big.bin"
    payload = _payload(6 << 20)
    storage.write_bytes(url, payload)
    cutting_proxy.cut("down", 1 << 20)
    cutting_proxy.cut("down", 2 << 20)  # the resumed request is cut too
    with caplog.at_level("WARNING"):
        assert storage.read_bytes(url) == payload
    assert cutting_proxy.done == [("down", 1 << 20), ("down", 2 << 20)]
    assert f"cannot read {url} at byte" in caplog.text
    cutting_proxy.cut("down", 3 << 20)
    storage.download_file(url, str(tmp_path / "big.bin"))
    assert (tmp_path / "big.bin").read_bytes() == payload and len(cutting_proxy.done) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["big.bin"]  # no partial file left beside it


def test_a_compressed_source_cut_mid_stream_yields_every_line_once(cutting_proxy, s3_bucket, tmp_path):
    import zstandard

    from cpt.data import sources, synthetic

    src = tmp_path / "docs.jsonl"
    synthetic.write_jsonl(src, {"a": "prose", "b": "code"}, docs=3000, seed=5, domain_key="meta.set")
    packed = zstandard.ZstdCompressor(level=1).compress(src.read_bytes())
    assert len(packed) > 600_000
    url = f"{s3_bucket}/docs.jsonl.zst"
    storage.write_bytes(url, packed)
    cutting_proxy.cut("down", 200_000)
    cutting_proxy.cut("down", 150_000)
    lines = [line for _, line in sources.iter_lines(url)]
    assert len(cutting_proxy.done) == 2
    assert lines == src.read_bytes().splitlines(keepends=True)


@pytest.mark.parametrize("size", [3 << 20, 20 << 20], ids=["single-put", "multipart"])
def test_an_upload_cut_mid_transfer_is_sent_again_whole(cutting_proxy, s3_bucket, tmp_path, size):
    src = tmp_path / "ckpt.pt"
    src.write_bytes(_payload(size))
    cutting_proxy.cut("up", size // 3)
    url = f"{s3_bucket}/run/ep0-ba8-rank0.pt"
    storage.upload_file(str(src), url)
    assert cutting_proxy.done == [("up", size // 3)]
    assert storage.read_bytes(url) == src.read_bytes()


def test_a_connection_that_keeps_dropping_fails_naming_the_object_and_byte(cutting_proxy, s3_bucket, monkeypatch):
    monkeypatch.setattr(storage, "_retry_s", 2.0)
    url = f"{s3_bucket}/big.bin"
    storage.write_bytes(url, _payload(4 << 20))
    cutting_proxy.cut("down", 1 << 20)
    for _ in range(200):  # after the first megabyte, every connection drops before any byte arrives
        cutting_proxy.cut("down", 0)
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError, match=rf"cannot read {url} at byte [\d,]+ of 4,194,304: S3 unreachable"):
        storage.read_bytes(url)
    assert time.monotonic() - t0 < 10


def test_an_object_replaced_during_a_cut_read_is_not_spliced(cutting_proxy, s3_bucket):
    """The resumed request asks for the same ETag: bytes of a newer object are never appended to the old."""
    url = f"{s3_bucket}/big.bin"
    storage.write_bytes(url, _payload(4 << 20))
    cutting_proxy.cut("down", 1 << 20)
    with storage.open_binary(url) as fh:  # the first request is answered before the object is replaced
        storage.write_bytes(url, _payload(5 << 20))
        replaced = rf"cannot read {url} at byte [\d,]+ of 4,194,304: the object was replaced"
        with pytest.raises(storage.StorageError, match=replaced):
            fh.read()


def test_many_threads_share_storage_calls_at_once(s3_bucket):
    """16 threads write, read, list and delete at once; each gets its own client (boto3 sessions are not
    thread-safe), built once per thread."""
    import threading

    errors, clients = [], {}
    start = threading.Barrier(16)

    def work(i: int) -> None:
        try:
            start.wait()
            mine = {id(storage.s3_client()) for _ in range(3)}
            clients[i] = mine
            for j in range(10):
                url = f"{s3_bucket}/threads/{i}/{j}.bin"
                payload = f"{i}:{j}".encode() * 100
                storage.write_bytes(url, payload)
                assert storage.read_bytes(url) == payload
                assert storage.exists(url)
            assert sorted(storage.list_prefix(f"{s3_bucket}/threads/{i}")) == sorted(f"{j}.bin" for j in range(10))
            for j in range(0, 10, 2):
                storage.delete(f"{s3_bucket}/threads/{i}/{j}.bin")
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append((i, repr(exc)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    assert all(len(c) == 1 for c in clients.values())  # one client per thread, reused
    assert len(set().union(*clients.values())) == 16  # and not shared between threads
    left = storage.list_prefix(f"{s3_bucket}/threads")
    assert sorted(left) == sorted(f"{i}/{j}.bin" for i in range(16) for j in range(1, 10, 2))
