"""A real S3 HTTP endpoint on loopback (moto's ThreadedMotoServer) for the test session.

Import from tests/conftest.py with ``from tests.fixtures_s3 import *``.
"""

from __future__ import annotations

import atexit
import functools
import uuid

import boto3
import pytest
from moto.server import ThreadedMotoServer

__all__ = ["s3_endpoint", "s3_client", "s3_bucket"]

_FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    # Keep a developer's ~/.aws and the EC2 metadata service out of the tests.
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@functools.lru_cache(maxsize=1)
def _moto_endpoint() -> str:
    # One server per process, even if conftest and a test module both import the
    # fixture (pytest then holds two session FixtureDefs): they share this endpoint.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    atexit.register(server.stop)
    host, port = server.get_host_and_port()
    return f"http://{host}:{port}"


@pytest.fixture(scope="session")
def s3_endpoint():
    """Start moto on a free loopback port; point boto3 at it through AWS_* env vars."""
    endpoint = _moto_endpoint()
    # Session scope cannot use the function-scoped monkeypatch; a private one undoes too.
    with pytest.MonkeyPatch.context() as mp:
        for name, value in _FAKE_AWS_ENV.items():
            mp.setenv(name, value)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        yield endpoint


@pytest.fixture(scope="session")
def s3_client(s3_endpoint):
    """A plain boto3 client on the moto endpoint, for arranging and inspecting buckets."""
    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


@pytest.fixture
def s3_bucket(s3_client):
    """A fresh, empty bucket per test; emptied and deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    yield name
    listed = s3_client.list_objects_v2(Bucket=name).get("Contents", [])
    for obj in listed:
        s3_client.delete_object(Bucket=name, Key=obj["Key"])
    s3_client.delete_bucket(Bucket=name)
