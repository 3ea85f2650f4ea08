"""`FileStorage` on an S3-compatible bucket (AWS S3, MinIO, Ceph, R2, ...): what several replicas share.

The only module that imports boto3; it is imported when files.storage = "s3" is chosen, not before. boto3 is
synchronous, so every call runs on a worker thread. An upload is held one part at a time
(files.s3.part_bytes): smaller than a part it is one PUT, larger it is a multipart upload, aborted when the
upload fails or is refused so the bucket keeps no parts. botocore's errors become 503s naming the settings.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from gateway.config import ConfigError, S3FilesConfig
from gateway.errors import ServiceUnavailable
from gateway.files.storage import READ_BYTES, check_key

log = logging.getLogger(__name__)
T = TypeVar("T")
_MISSING = ("NoSuchKey", "404", "NotFound")


def _secret(env_name: str | None, setting: str) -> str | None:
    if env_name is None:
        return None
    value = os.environ.get(env_name)
    if not value:
        raise ConfigError("environment", [f"files.s3.{setting}: environment variable {env_name} is not set"])
    return value


class S3Storage:
    def __init__(self, config: S3FilesConfig) -> None:
        import boto3
        from botocore.config import Config as BotoConfig
        from botocore.exceptions import BotoCoreError, ClientError

        self._errors: tuple[type[Exception], ...] = (BotoCoreError, ClientError)
        self._client_error = ClientError
        self._bucket, self._prefix, self._part_bytes = config.bucket, config.prefix, config.part_bytes
        boto = BotoConfig(
            connect_timeout=config.timeout_s,
            read_timeout=config.timeout_s,
            retries={"max_attempts": 3, "mode": "standard"},
            # A custom endpoint (MinIO, a test server) rarely has a DNS name per bucket.
            s3={"addressing_style": "path" if config.endpoint_url else "auto"},
        )
        self._client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=config.endpoint_url,
            region_name=config.region,
            aws_access_key_id=_secret(config.access_key_id_env, "access_key_id_env"),
            aws_secret_access_key=_secret(config.secret_access_key_env, "secret_access_key_env"),
            aws_session_token=_secret(config.session_token_env, "session_token_env"),
            config=boto,
        )

    def _object(self, key: str) -> str:
        return self._prefix + check_key(key)

    def _failed(self, exc: Exception) -> ServiceUnavailable:
        code = self._code(exc) or type(exc).__name__
        log.warning("S3 file storage: %s", code)
        return ServiceUnavailable(
            f"the S3 file storage failed ({code}); check files.s3.bucket, endpoint_url, region and the "
            "credentials' environment variables"
        )

    def _code(self, exc: Exception) -> str | None:
        if isinstance(exc, self._client_error):
            return str(getattr(exc, "response", {}).get("Error", {}).get("Code", "")) or None
        return None

    async def _call(self, fn: Callable[..., T], **kwargs: Any) -> T:
        try:
            return await asyncio.to_thread(fn, **kwargs)
        except self._errors as exc:
            raise self._failed(exc) from None

    async def put(self, key: str, chunks: AsyncIterator[bytes]) -> int:
        where = {"Bucket": self._bucket, "Key": self._object(key)}
        pending = bytearray()
        size = 0
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        try:
            async for chunk in chunks:
                pending += chunk
                size += len(chunk)
                if len(pending) >= self._part_bytes:
                    if upload_id is None:
                        started = await self._call(self._client.create_multipart_upload, **where)
                        upload_id = str(started["UploadId"])
                    parts.append(await self._part(where, upload_id, len(parts) + 1, pending))
                    pending.clear()
            if upload_id is None:
                await self._call(self._client.put_object, Body=bytes(pending), **where)
                return size
            if pending or not parts:
                parts.append(await self._part(where, upload_id, len(parts) + 1, pending))
            done = {"Parts": parts}
            await self._call(
                self._client.complete_multipart_upload, UploadId=upload_id, MultipartUpload=done, **where
            )
        except BaseException:
            if upload_id is not None:
                await self._abort(where, upload_id)
            raise
        return size

    async def _part(
        self, where: dict[str, str], upload_id: str, number: int, data: bytearray
    ) -> dict[str, Any]:
        sent = await self._call(
            self._client.upload_part, UploadId=upload_id, PartNumber=number, Body=bytes(data), **where
        )
        return {"ETag": sent["ETag"], "PartNumber": number}

    async def _abort(self, where: dict[str, str], upload_id: str) -> None:
        try:
            await asyncio.to_thread(self._client.abort_multipart_upload, UploadId=upload_id, **where)
        except self._errors as exc:  # the bucket's lifecycle rule for incomplete uploads is the backstop
            log.warning("S3 file storage: aborting a failed upload failed (%s)", type(exc).__name__)

    async def get(self, key: str) -> AsyncIterator[bytes]:
        try:
            found = await asyncio.to_thread(
                self._client.get_object, Bucket=self._bucket, Key=self._object(key)
            )
        except self._errors as exc:
            if self._code(exc) in _MISSING:
                log.warning("S3 file storage: an object with metadata is missing")
                raise ServiceUnavailable(
                    "this file's content is missing from the S3 bucket (files.s3.bucket, files.s3.prefix)"
                ) from None
            raise self._failed(exc) from None
        return self._read(found["Body"])

    async def _read(self, body: Any) -> AsyncIterator[bytes]:
        try:
            while piece := await self._call(body.read, amt=READ_BYTES):
                yield piece
        finally:
            body.close()

    async def delete(self, key: str) -> None:
        await self._call(self._client.delete_object, Bucket=self._bucket, Key=self._object(key))

    async def aclose(self) -> None:
        self._client.close()
