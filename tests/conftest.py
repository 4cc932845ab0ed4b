"""Shared fixtures: a Kafka broker for the session (embedded Tansu, or an external one
named by $SPOTBATCH_KAFKA_BOOTSTRAP) and a fresh topic per test. S3 fixtures come from
tests/fixtures_s3.py.
"""

from __future__ import annotations

import os
import uuid

import pytest

from spotbatch.embedded import start_or_external
from spotbatch.kafka_admin import ensure_topics
from tests.fixtures_s3 import *  # noqa: F401,F403

TOPIC_PARTITIONS = 4


@pytest.fixture(scope="session")
def kafka_bootstrap():
    """host:port of a Kafka broker; started lazily, only by tests that ask for it."""
    with start_or_external() as broker:
        yield broker.bootstrap


@pytest.fixture
def topic(kafka_bootstrap):
    """A new, uniquely named topic with TOPIC_PARTITIONS partitions."""
    name = f"test-{uuid.uuid4().hex}"
    ensure_topics(kafka_bootstrap, {name: TOPIC_PARTITIONS})
    return name


@pytest.fixture
def clean_env(monkeypatch):
    """No SPOTBATCH_* from the outer environment may leak into a test (settings tests)."""
    for key in list(os.environ):
        if key.startswith("SPOTBATCH_"):
            monkeypatch.delenv(key)

