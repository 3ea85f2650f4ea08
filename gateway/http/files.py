"""`/v1/files`: upload (multipart, streamed), list, retrieve, download and delete a team's files.

Invariants: an upload is read part by part and its file streamed into storage (gateway/files/service.py),
never held whole; a body declaring more than files.max_bytes (plus the form's small envelope) is refused
before a byte is read. A key sees only its own team's files: another team's id is a 404, exactly like an id
that never existed. These routes never reach a backend, so they leave no ledger row.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict
from starlette.responses import Response, StreamingResponse

from gateway.errors import InvalidRequest, UnsupportedParameter
from gateway.files.service import FileService, Received, check_filename, check_purpose
from gateway.http.auth import authenticate
from gateway.http.deps import FileDeps, router_deps
from gateway.http.multipart import MAX_HEADER_BYTES, MAX_PARTS, MultipartReader, boundary_of
from gateway.http.openapi import TAG_TEAM, errors, ok
from gateway.records import KeyIdentity
from gateway.store.files import StoredFile

JSON = "application/json"
FIELD_BYTES = 256  # `purpose` and the like
# What a form may add to its file: a few small fields, each with its headers and boundary lines.
ENVELOPE_BYTES = MAX_PARTS * (MAX_HEADER_BYTES + FIELD_BYTES + 80)


class FileObject(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    expires_at: int | None
    status_details: str | None


class FileList(BaseModel):
    model_config = ConfigDict(extra="allow")
    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "purpose"],
                "properties": {
                    "file": {
                        "type": "string",
                        "format": "binary",
                        "description": "JSONL, one request a line",
                    },
                    "purpose": {"type": "string", "enum": ["batch"]},
                },
            }
        }
    },
}


def _json(value: Any) -> Response:
    return Response(orjson.dumps(value), media_type=JSON)


async def _caller(request: Request) -> tuple[FileService, KeyIdentity, dt.datetime]:
    deps: FileDeps = router_deps(request).files
    now = dt.datetime.now(dt.UTC)
    identity = await authenticate(deps.access, request.headers.get("authorization"), now=now)
    return deps.files, identity, now


async def _upload(
    files: FileService, reader: MultipartReader, identity: KeyIdentity, now: dt.datetime
) -> StoredFile:
    purpose: str | None = None
    filename = ""
    received: Received | None = None
    try:
        async for part in reader.parts():
            if part.name == "purpose" and purpose is None:
                purpose = check_purpose((await reader.field(FIELD_BYTES)).strip())
            elif part.name == "file" and received is None:
                if part.filename is None:
                    raise InvalidRequest(
                        "`file` must be a file part (with a filename), not a text field", param="file"
                    )
                filename = check_filename(part.filename)
                received = await files.receive(reader.data())
            elif part.name.startswith("expires_after"):
                raise UnsupportedParameter(
                    "`expires_after` is not supported: files are kept until deleted", param="expires_after"
                )
            else:
                raise InvalidRequest(
                    f"unexpected form field `{part.name[:64]}` (POST /v1/files takes one `file` and one "
                    "`purpose`)",
                    param=part.name[:64] or None,
                )
        if received is None or purpose is None:
            missing = "file" if received is None else "purpose"
            raise InvalidRequest(f"missing required form field `{missing}`", param=missing)
        return await files.register(
            received, team=identity.team, key_id=identity.key_id, filename=filename, purpose=purpose, now=now
        )
    except BaseException:
        if received is not None:
            await files.discard(received)
        raise


def files_router() -> APIRouter:
    router = APIRouter()
    found = errors(401, 404, 503)

    @router.post(
        "/v1/files",
        tags=[TAG_TEAM],
        responses={**ok(FileObject, "the stored file"), **errors(401, 413, 503)},
        openapi_extra={"requestBody": UPLOAD_BODY},
    )
    async def create_file(request: Request) -> Response:
        files, identity, now = await _caller(request)
        boundary = boundary_of(request.headers.get("content-type"))
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > files.max_bytes + ENVELOPE_BYTES:
            raise files.too_large()
        stored = await _upload(files, MultipartReader(request.stream(), boundary), identity, now)
        return _json(stored.wire())

    @router.get(
        "/v1/files", tags=[TAG_TEAM], responses={**ok(FileList, "the team's files"), **errors(401, 503)}
    )
    async def list_files(
        request: Request,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
        order: Annotated[Literal["asc", "desc"], Query()] = "desc",
        after: Annotated[str | None, Query(max_length=128)] = None,
        purpose: Annotated[str | None, Query(max_length=64)] = None,
    ) -> Response:
        files, identity, _ = await _caller(request)
        page = await files.page(identity.team, limit=limit, order=order, after=after, purpose=purpose)
        data = [f.wire() for f in page.files]
        return _json(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": page.has_more,
            }
        )

    @router.get("/v1/files/{file_id}", tags=[TAG_TEAM], responses={**ok(FileObject, "the file"), **found})
    async def retrieve_file(request: Request, file_id: str) -> Response:
        files, identity, _ = await _caller(request)
        return _json((await files.get(file_id, identity.team)).wire())

    @router.get(
        "/v1/files/{file_id}/content",
        tags=[TAG_TEAM],
        responses={**ok(None, "the file's bytes", media="application/octet-stream"), **found},
    )
    async def file_content(request: Request, file_id: str) -> Response:
        files, identity, _ = await _caller(request)
        stored, chunks = await files.content(file_id, identity.team)
        headers = {"content-length": str(stored.bytes)}
        return StreamingResponse(chunks, media_type="application/octet-stream", headers=headers)

    @router.delete("/v1/files/{file_id}", tags=[TAG_TEAM], responses={**ok(FileDeleted, "deleted"), **found})
    async def delete_file(request: Request, file_id: str) -> Response:
        files, identity, _ = await _caller(request)
        await files.delete(file_id, identity.team)
        return _json({"id": file_id, "object": "file", "deleted": True})

    return router
