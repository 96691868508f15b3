"""Shared fixtures: a local S3-compatible server (moto, 127.0.0.1, random port) and fresh buckets on it."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from gradshard.store import S3Store

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The endpoint URL of a moto S3 server started for this test session (and stopped after it).

    Dummy credentials go into the environment, so worker processes forked later find them too.
    """
    from s3_server import start_moto

    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    server, endpoint = start_moto()
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def new_s3_store(endpoint: str, prefix: str = "run", **options: object) -> S3Store:
    """A store on a new, empty bucket."""
    store = S3Store(f"test-{uuid.uuid4().hex[:20]}", prefix, endpoint_url=endpoint, **options)  # type: ignore[arg-type]
    store.create_bucket()
    return store


@pytest.fixture
def s3_store(s3_endpoint: str) -> S3Store:
    return new_s3_store(s3_endpoint)
