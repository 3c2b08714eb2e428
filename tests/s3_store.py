"""A local S3: moto's standalone server on 127.0.0.1, reached by the real s3fs/botocore
through ``AWS_ENDPOINT_URL`` (real S3 HTTP: HEAD, ranged GET, listings, multipart)."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest


@dataclass
class S3Store:
    endpoint: str
    client: Any
    bucket: str

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put(self, key: str, data: bytes) -> str:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        return self.url(key)

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                      Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", ()))

    def uploads(self) -> list[dict[str, Any]]:
        return self.client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])


AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
           "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def aws_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """The standard AWS chain, pointed at ``endpoint``; no profile or config file is read."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Store]:
    """A fresh bucket on the local S3, with the AWS environment pointing at it."""
    import boto3

    aws_env(monkeypatch, moto_endpoint)
    client = boto3.client("s3", endpoint_url=moto_endpoint)
    bucket = f"ckpt-{secrets.token_hex(4)}"
    client.create_bucket(Bucket=bucket)
    yield S3Store(moto_endpoint, client, bucket)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
