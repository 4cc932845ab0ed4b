"""Checkpoints on S3: ``s3://bucket/prefix/<job_id>.json``, one object per job.

The compare-and-swap uses S3 conditional writes: the first save PUTs with
``If-None-Match: *`` (fails if any worker created it meanwhile), later saves read the
record and its ETag, check the generation, and PUT with ``If-Match: <etag>`` (fails if
anyone wrote in between). S3 answers 412 (or 409 for a concurrent conditional write)
and we raise StaleCheckpoint.
"""

from __future__ import annotations

import botocore.exceptions

from spotbatch.retry import S3_RETRY
from spotbatch.storage import _env_endpoint, _is_missing, _make_client, parse_uri

from .progress import Progress
from .store import StaleCheckpoint, check_job_id, decode, next_generation

__all__ = ["S3CheckpointStore"]

_CONFLICT_STATUS = (409, 412)


class S3CheckpointStore:
    def __init__(self, uri: str, *, endpoint_url: str | None = None, client=None) -> None:
        loc = parse_uri(uri)
        if loc.scheme != "s3":
            raise ValueError(f"{uri!r} is not an s3:// location")
        self.bucket, self.prefix = loc.bucket, loc.path.strip("/")
        self._client = client if client is not None else _make_client(endpoint_url or _env_endpoint())

    def load(self, job_id: str) -> Progress | None:
        found = self._read(job_id)
        return found[0] if found else None

    def save(self, progress: Progress, *, expected_generation: int | None) -> Progress:
        job_id = progress.job_id
        condition = self._condition(job_id, expected_generation)
        saved = next_generation(progress, expected_generation)
        body = saved.to_json()
        try:
            self._put(self._key(job_id), body, condition)
        except botocore.exceptions.ClientError as exc:
            if not (_is_conflict(exc) or _is_missing(exc)):
                raise
            self._raise_unless_landed(job_id, expected_generation, body)
        return saved

    def delete(self, job_id: str) -> None:
        self._delete(self._key(job_id))  # S3 answers 204 for a missing key too

    def _condition(self, job_id: str, expected: int | None) -> dict[str, str]:
        if expected is None:
            return {"IfNoneMatch": "*"}
        found = self._read(job_id)
        if found is None:
            raise StaleCheckpoint(job_id, expected, None)
        progress, etag = found
        if progress.generation != expected:
            raise StaleCheckpoint(job_id, expected, progress.generation)
        return {"IfMatch": etag}

    def _raise_unless_landed(self, job_id: str, expected: int | None, body: bytes) -> None:
        # S3_RETRY may resend a PUT whose first try landed but whose answer was lost;
        # the resend then fails its own precondition. Our exact bytes stored = success.
        current = self._read_raw(self._key(job_id))
        if current is not None and current[0] == body:
            return
        found = decode(current[0], job_id, self._uri(job_id)).generation if current else None
        raise StaleCheckpoint(job_id, expected, found)

    def _read(self, job_id: str) -> tuple[Progress, str] | None:
        raw = self._read_raw(self._key(job_id))
        if raw is None:
            return None
        return decode(raw[0], job_id, self._uri(job_id)), raw[1]

    def _read_raw(self, key: str) -> tuple[bytes, str] | None:
        try:
            return self._get(key)
        except botocore.exceptions.ClientError as exc:
            if _is_missing(exc):
                return None
            raise

    def _key(self, job_id: str) -> str:
        name = check_job_id(job_id) + ".json"
        return f"{self.prefix}/{name}" if self.prefix else name

    def _uri(self, job_id: str) -> str:
        return f"s3://{self.bucket}/{self._key(job_id)}"

    @S3_RETRY
    def _get(self, key: str) -> tuple[bytes, str]:
        # Body and ETag from one response: the ETag names exactly the bytes we read.
        reply = self._client.get_object(Bucket=self.bucket, Key=key)
        return reply["Body"].read(), reply["ETag"]

    @S3_RETRY
    def _put(self, key: str, body: bytes, condition: dict[str, str]) -> None:
        self._client.put_object(Bucket=self.bucket, Key=key, Body=body,
                                ContentType="application/json", **condition)

    @S3_RETRY
    def _delete(self, key: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=key)


def _is_conflict(exc: botocore.exceptions.ClientError) -> bool:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return status in _CONFLICT_STATUS or exc.response.get("Error", {}).get("Code") == "PreconditionFailed"
