"""A local S3-compatible server for tests: moto in server mode on a free loopback port, with its bucket.

`moto_s3()` yields the endpoint URL; `S3_ENV` names the environment variables the gateway's config points
at for credentials (moto accepts any). `s3_client(url)` is a boto3 client for looking into the bucket.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

S3_ENV = {"SB_TEST_S3_KEY_ID": "test-key-id", "SB_TEST_S3_SECRET": "test-secret-key"}
REGION = "us-east-1"


def s3_settings(endpoint_url: str, bucket: str, **extra: Any) -> dict[str, Any]:
    """The `[files.s3]` table for a bucket on the test server."""
    return {
        "bucket": bucket,
        "endpoint_url": endpoint_url,
        "region": REGION,
        "access_key_id_env": "SB_TEST_S3_KEY_ID",
        "secret_access_key_env": "SB_TEST_S3_SECRET",
        **extra,
    }


def s3_client(endpoint_url: str) -> Any:
    import boto3

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id=S3_ENV["SB_TEST_S3_KEY_ID"],
        aws_secret_access_key=S3_ENV["SB_TEST_S3_SECRET"],
    )


@contextmanager
def moto_s3(*buckets: str) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    os.environ.update(S3_ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    try:
        client = s3_client(url)
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        client.close()
        yield url
    finally:
        server.stop()
