"""The `FileStorage` contract, on a local directory and on S3 (a moto server the test starts): streamed puts,
whole-or-nothing objects, failures that leave nothing behind and name the setting to check."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import S3FilesConfig
from gateway.errors import ServiceUnavailable
from gateway.files.storage import FileStorage, LocalStorage
from tests.support.s3 import moto_s3, s3_client, s3_settings

MiB = 1 << 20
PART = 5 * MiB  # S3's smallest part: an upload past it is a multipart upload


class Refused(Exception):
    pass


async def chunks(total: int, *, chunk: int = 1 << 18, fail_after: int | None = None) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        if fail_after is not None and sent >= fail_after:
            raise Refused("the source gave up")
        size = min(chunk, total - sent)
        yield hashlib.sha256(str(sent).encode()).digest() * (size // 32) + b"x" * (size % 32)
        sent += size


async def stored(storage: FileStorage, key: str) -> bytes:
    return b"".join([piece async for piece in await storage.get(key)])


@pytest.fixture(scope="module")
def s3_url() -> Iterator[str]:
    with moto_s3("sb-files") as url:
        yield url


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    if request.param == "local":
        yield "local", LocalStorage(tmp_path / "files")
        return
    url = request.getfixturevalue("s3_url")
    from gateway.files.s3 import S3Storage

    yield url, S3Storage(S3FilesConfig(**s3_settings(url, "sb-files", prefix=f"t-{os.urandom(4).hex()}/")))


async def test_put_get_delete(storage: tuple[str, Any]) -> None:
    _, store = storage
    assert await store.put("file-small", chunks(1000, chunk=100)) == 1000
    assert await stored(store, "file-small") == b"".join([c async for c in chunks(1000, chunk=100)])
    large = 2 * PART + 12345  # three parts on S3
    assert await store.put("file-large", chunks(large)) == large
    assert await stored(store, "file-large") == b"".join([c async for c in chunks(large)])
    await store.delete("file-small")
    await store.delete("file-small")  # already gone: not an error
    with pytest.raises(ServiceUnavailable, match="content"):
        await store.get("file-small")
    assert len(await stored(store, "file-large")) == large  # the other object is untouched
    with pytest.raises(ValueError):
        await store.put("../escape", chunks(10))
    await store.aclose()


@pytest.mark.parametrize("fail_after", [0, 3 * MiB, 2 * PART + MiB])
async def test_a_failed_source_leaves_nothing(
    storage: tuple[str, Any], tmp_path: Path, fail_after: int
) -> None:
    where, store = storage
    with pytest.raises(Refused):  # the source's own exception, unchanged
        await store.put("file-refused", chunks(4 * PART, fail_after=fail_after))
    with pytest.raises(ServiceUnavailable):
        await store.get("file-refused")
    if where == "local":
        assert list((tmp_path / "files").iterdir()) == []  # no .part file either
    else:
        client = s3_client(where)
        assert "Uploads" not in client.list_multipart_uploads(Bucket="sb-files")  # aborted, no parts kept
        client.close()
    await store.aclose()


async def test_an_unusable_directory_names_the_setting(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_bytes(b"")
    store = LocalStorage(tmp_path / "a-file" / "files")
    with pytest.raises(ServiceUnavailable, match="files.local_dir"):
        await store.put("file-x", chunks(10))


@pytest.mark.slow
async def test_a_missing_bucket_names_the_settings(s3_url: str) -> None:
    from gateway.files.s3 import S3Storage

    store = S3Storage(S3FilesConfig(**s3_settings(s3_url, "no-such-bucket")))
    with pytest.raises(ServiceUnavailable, match=r"NoSuchBucket.*files\.s3\.bucket"):
        await store.put("file-x", chunks(10))
    await store.aclose()
