"""`/v1/files` through the official `openai` SDK against a live gateway, on SQLite and PostgreSQL: upload,
list, retrieve, download, delete; team scoping; refusals (413, 400) that name what to change; an upload
streamed into storage while the client is still sending it."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import sqlalchemy as sa

from gateway.config import S3FilesConfig
from gateway.http.app import create_app
from gateway.store.db import make_engine
from tests.support.api_gateway import ADMIN_KEY, FAKE_UPSTREAM_KEY, Gateway, gateway_config
from tests.support.fake_provider import FakeProvider
from tests.support.live import LiveServer
from tests.support.s3 import moto_s3, s3_client, s3_settings

MiB = 1 << 20


def request_line(i: int, **overrides: Any) -> dict[str, Any]:
    body = {"model": "fast", "messages": [{"role": "user", "content": f"question {i}"}]}
    return {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": body,
        **overrides,
    }


def jsonl(*lines: dict[str, Any]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def client(gw: Gateway, team: str = "alpha") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key=gw.key(team), max_retries=0)


def files_dir(gw: Gateway) -> Path:
    return Path(gw.config.files.local_dir)


def test_upload_list_retrieve_download_delete(any_gateway: Gateway, tmp_path: Path) -> None:
    sdk = client(any_gateway)
    data = jsonl(*(request_line(i) for i in range(3)))
    path = tmp_path / "requests.jsonl"
    path.write_bytes(data)
    with path.open("rb") as handle:
        from_file = sdk.files.create(file=handle, purpose="batch")
    from_bytes = sdk.files.create(file=("inline.jsonl", data[: data.index(b"\n") + 1]), purpose="batch")

    assert from_file.object == "file" and from_file.id.startswith("file-") and from_file.status == "processed"
    assert (from_file.filename, from_file.bytes, from_file.purpose) == ("requests.jsonl", len(data), "batch")
    assert abs(from_file.created_at - time.time()) < 60
    assert from_bytes.filename == "inline.jsonl" and from_bytes.bytes == data.index(b"\n") + 1
    assert sdk.files.retrieve(from_file.id) == from_file
    listed = {f.id: f for f in sdk.files.list()}
    assert listed[from_file.id] == from_file and from_bytes.id in listed
    assert sdk.files.content(from_file.id).content == data  # byte-identical
    # Line counts are recorded for the batch that will read it.
    with any_gateway.db.connect() as conn:
        row = conn.execute(
            sa.text("SELECT lines, invalid_lines, team FROM files WHERE id = :i"), {"i": from_file.id}
        )
        assert tuple(row.one()) == (3, 0, "alpha")

    deleted = sdk.files.delete(from_file.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (from_file.id, True, "file")
    for gone in (lambda: sdk.files.retrieve(from_file.id), lambda: sdk.files.content(from_file.id)):
        with pytest.raises(openai.NotFoundError) as missing:
            gone()
        assert missing.value.body["param"] == "file_id"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        sdk.files.delete(from_file.id)
    assert from_file.id not in {f.id for f in sdk.files.list()}
    assert not (files_dir(any_gateway) / from_file.id).exists()  # its bytes went too


def test_listing_pages_orders_and_filters(any_gateway: Gateway) -> None:
    key = any_gateway.key("alpha")  # a team of files of its own would be better; ids are compared instead
    sdk = openai.OpenAI(base_url=any_gateway.v1, api_key=key, max_retries=0)
    ids = [
        sdk.files.create(file=(f"{i}.jsonl", jsonl(request_line(i))), purpose="batch").id for i in range(5)
    ]
    page = sdk.files.list(limit=2)
    assert len(page.data) == 2 and page.has_more
    newest_first = [f.id for f in sdk.files.list(limit=2) if f.id in ids]  # the SDK follows `after` pages
    assert newest_first == ids[::-1]
    oldest_first = [f.id for f in sdk.files.list(limit=3, order="asc") if f.id in ids]
    assert oldest_first == ids
    assert {f.id for f in sdk.files.list(purpose="batch")} >= set(ids)
    assert list(sdk.files.list(purpose="fine-tune")) == []
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.files.list(after="file-" + "0" * 32)
    assert bad.value.body["param"] == "after"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        sdk.files.list(limit=0)


def test_another_teams_files_are_invisible(any_gateway: Gateway) -> None:
    mine = client(any_gateway, "alpha").files.create(
        file=("a.jsonl", jsonl(request_line(1))), purpose="batch"
    )
    theirs = client(any_gateway, "beta")
    for attempt in (theirs.files.retrieve, theirs.files.content, theirs.files.delete):
        with pytest.raises(openai.NotFoundError) as missing:
            attempt(mine.id)
        assert missing.value.body["code"] == "not_found"  # type: ignore[index]
        assert "for this key's team" in missing.value.body["message"]  # type: ignore[index]
    assert mine.id not in {f.id for f in theirs.files.list()}
    assert client(any_gateway, "alpha").files.retrieve(mine.id).id == mine.id  # still there


def test_refusals_name_what_to_change(gateway: Gateway) -> None:
    sdk = client(gateway)
    before = set(os.listdir(files_dir(gateway))) if files_dir(gateway).exists() else set()
    one = jsonl(request_line(1))
    refusals: list[tuple[str, bytes, str, str, str]] = [
        ("a.jsonl", one, "fine-tune", "purpose", "batch"),
        ("a.csv", b"custom_id,body\n1,hi\n", "batch", "file", "line 1"),
        ("e.jsonl", b"\n\n", "batch", "file", "no lines"),
        ("a.jsonl", one + b"{oops\n", "batch", "file", "line 2 is not valid JSON"),
    ]
    for name, data, purpose, param, says in refusals:
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.files.create(file=(name, data), purpose=purpose)  # type: ignore[arg-type]
        assert refused.value.body["param"] == param and says in refused.value.body["message"]  # type: ignore[index]
    headers = {"authorization": f"Bearer {gateway.key()}"}
    with httpx.Client(base_url=gateway.base_url, headers=headers) as raw:
        not_multipart = raw.post("/v1/files", json={"purpose": "batch"})
        no_file = raw.post("/v1/files", files={"purpose": (None, "batch")})
        no_purpose = raw.post("/v1/files", files={"file": ("a.jsonl", jsonl(request_line(1)))})
        expiring = {"purpose": "batch", "expires_after[anchor]": "created_at"}
        extra = raw.post("/v1/files", data=expiring, files={"file": ("a.jsonl", one)})
        unauthenticated = httpx.post(gateway.base_url + "/v1/files", files={"file": ("a", b"{}")})
    assert not_multipart.status_code == 400 and not_multipart.json()["error"]["param"] == "Content-Type"
    assert no_file.status_code == 400 and "`file`" in no_file.json()["error"]["message"]
    assert no_purpose.status_code == 400 and "`purpose`" in no_purpose.json()["error"]["message"]
    assert extra.status_code == 400 and extra.json()["error"]["param"] == "expires_after"
    assert unauthenticated.status_code == 401
    after = set(os.listdir(files_dir(gateway))) if files_dir(gateway).exists() else set()
    assert after <= before | {f.id for f in sdk.files.list()}  # refused uploads left no bytes behind


def test_lines_that_are_no_valid_request_are_counted_not_refused(gateway: Gateway) -> None:
    data = jsonl(request_line(1), request_line(2, method="GET"), request_line(1), {"custom_id": "x"})
    uploaded = client(gateway).files.create(file=("mixed.jsonl", data), purpose="batch")
    with gateway.db.connect() as conn:
        row = conn.execute(
            sa.text("SELECT lines, invalid_lines FROM files WHERE id = :i"), {"i": uploaded.id}
        )
        assert tuple(row.one()) == (4, 3)  # they become error-file entries when the batch runs


# ---- size limit and streaming ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_gateway(fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("files-small")
    os.environ["SB_TEST_ADMIN_KEY"] = ADMIN_KEY
    os.environ["SB_TEST_FAKE_KEY"] = FAKE_UPSTREAM_KEY
    config = gateway_config(fake.base_url, {"url": f"sqlite:///{tmp}/sb.db", "spill_path": str(tmp / "s")})
    files = config.files.model_copy(update={"max_bytes": 4096})
    config = config.model_copy(update={"files": files})
    with LiveServer(create_app(config)) as server:
        engine = make_engine(config.database.url)
        try:
            yield Gateway(server.base_url, config, engine, fake)
        finally:
            engine.dispose()


def test_an_upload_over_max_bytes_is_a_413_naming_the_setting(small_gateway: Gateway) -> None:
    sdk = client(small_gateway)
    big = jsonl(*(request_line(i) for i in range(60)))
    assert len(big) > 4096
    with pytest.raises(openai.APIStatusError) as declared:  # Content-Length says so: refused before reading
        sdk.files.create(file=("big.jsonl", big), purpose="batch")
    assert declared.value.status_code == 413

    def chunked() -> Iterator[bytes]:  # no Content-Length: refused while streaming
        yield b'--BB\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        yield b'--BB\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
        for start in range(0, len(big), 1000):
            yield big[start : start + 1000]
        yield b"\r\n--BB--\r\n"

    streamed = httpx.post(
        small_gateway.v1 + "/files",
        content=chunked(),
        headers={
            "authorization": f"Bearer {small_gateway.key()}",
            "content-type": "multipart/form-data; boundary=BB",
        },
    )
    for answer in (declared.value.response, streamed):
        error = answer.json()["error"]
        assert answer.status_code == 413 and error["code"] == "payload_too_large"
        assert "files.max_bytes (4096 bytes)" in error["message"] and error["param"] == "file"
    whole_lines = big[: big.rindex(b"\n", 0, 4096) + 1]
    fits = sdk.files.create(file=("fits.jsonl", whole_lines), purpose="batch")
    assert fits.bytes == len(whole_lines) and [f.id for f in sdk.files.list()] == [fits.id]
    assert sorted(os.listdir(files_dir(small_gateway))) == [fits.id]  # nothing left of the refused ones


def test_an_upload_reaches_storage_while_it_is_still_being_sent(gateway: Gateway) -> None:
    """A handler that buffered the body would write nothing until the client finished: this client stops
    sending at 16 MiB until the gateway's storage holds 8 MiB of it, then sends 34 MiB more."""
    line = orjson.dumps(request_line(0, body={"model": "fast", "input": "y" * 1000})) + b"\n"
    total_lines = 50 * MiB // len(line)
    storage = files_dir(gateway)
    digest = hashlib.sha256()
    seen_on_disk: list[int] = []
    sent = [0]

    def on_disk() -> int:
        parts = list(storage.glob(".file-*.part")) if storage.exists() else []
        return max((p.stat().st_size for p in parts), default=0)

    def body() -> Iterator[bytes]:
        yield b'--BB\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        yield b'--BB\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
        for i in range(total_lines):
            piece = line.replace(b'"req-0"', b'"r-%08d"' % i)
            digest.update(piece)
            sent[0] += len(piece)
            yield piece
            if i == 16 * MiB // len(line):
                deadline = time.monotonic() + 60
                while (written := on_disk()) < 8 * MiB and time.monotonic() < deadline:
                    time.sleep(0.05)
                seen_on_disk.append(written)
        yield b"\r\n--BB--\r\n"

    headers = {"authorization": f"Bearer {gateway.key()}", "content-type": "multipart/form-data; boundary=BB"}
    answer = httpx.post(gateway.v1 + "/files", content=body(), headers=headers, timeout=120)
    assert answer.status_code == 200, answer.text
    assert seen_on_disk and seen_on_disk[0] >= 8 * MiB, "nothing reached storage before the body ended"
    uploaded = answer.json()
    assert uploaded["bytes"] == sent[0] > 49 * MiB
    check = hashlib.sha256()
    with httpx.stream("GET", f"{gateway.v1}/files/{uploaded['id']}/content", headers=headers) as download:
        assert download.headers["content-length"] == str(uploaded["bytes"])
        for piece in download.iter_bytes():
            check.update(piece)
    assert check.hexdigest() == digest.hexdigest()
    client(gateway).files.delete(uploaded["id"])


def test_concurrent_uploads_do_not_mix(gateway: Gateway) -> None:
    sdk = client(gateway)
    datas = [jsonl(*(request_line(i * 100 + j) for j in range(200))) for i in range(4)]
    results: dict[int, str] = {}

    def upload(i: int) -> None:
        results[i] = sdk.files.create(file=(f"{i}.jsonl", io.BytesIO(datas[i])), purpose="batch").id

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [sdk.files.content(results[i]).content == datas[i] for i in range(4)] == [True] * 4


# ---- S3 storage (a moto server the test starts) ---------------------------------------------------------


@pytest.fixture(scope="module")
def s3_gateway(fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, str]]:
    tmp = tmp_path_factory.mktemp("files-s3")
    os.environ["SB_TEST_ADMIN_KEY"] = ADMIN_KEY
    os.environ["SB_TEST_FAKE_KEY"] = FAKE_UPSTREAM_KEY
    with moto_s3("sb-api-files") as url:
        config = gateway_config(
            fake.base_url, {"url": f"sqlite:///{tmp}/sb.db", "spill_path": str(tmp / "s")}
        )
        s3 = S3FilesConfig(**s3_settings(url, "sb-api-files", prefix="gw/", part_bytes=5 * MiB))
        files = config.files.model_copy(update={"storage": "s3", "s3": s3})
        config = config.model_copy(update={"files": files})
        with LiveServer(create_app(config)) as server:
            engine = make_engine(config.database.url)
            try:
                yield Gateway(server.base_url, config, engine, fake), url
            finally:
                engine.dispose()


def test_files_on_s3(s3_gateway: tuple[Gateway, str]) -> None:
    gw, url = s3_gateway
    sdk = client(gw)
    small = jsonl(*(request_line(i) for i in range(3)))
    large = jsonl(*(request_line(i, body={"model": "fast", "input": "z" * 2000}) for i in range(6000)))
    assert len(large) > 2 * 5 * MiB  # a multipart upload of three parts
    uploaded = [
        sdk.files.create(file=(f"{n}.jsonl", d), purpose="batch") for n, d in (("s", small), ("l", large))
    ]
    bucket = s3_client(url)
    keys = {o["Key"]: o["Size"] for o in bucket.list_objects_v2(Bucket="sb-api-files")["Contents"]}
    assert keys == {f"gw/{uploaded[0].id}": len(small), f"gw/{uploaded[1].id}": len(large)}
    assert sdk.files.content(uploaded[0].id).content == small
    assert sdk.files.content(uploaded[1].id).content == large
    with pytest.raises(openai.NotFoundError):
        client(gw, "beta").files.content(uploaded[1].id)
    with pytest.raises(openai.BadRequestError):  # refused after a part was sent: the upload is aborted
        sdk.files.create(file=("bad.jsonl", large + b"not json\n"), purpose="batch")
    assert "Uploads" not in bucket.list_multipart_uploads(Bucket="sb-api-files")
    sdk.files.delete(uploaded[1].id)
    remaining = [o["Key"] for o in bucket.list_objects_v2(Bucket="sb-api-files")["Contents"]]
    assert remaining == [f"gw/{uploaded[0].id}"]
    bucket.close()
