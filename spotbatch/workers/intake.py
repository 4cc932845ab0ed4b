"""Turning one Kafka record into a batchable job, or a JobError that names why not."""

from __future__ import annotations

from typing import Any, cast

from spotbatch.errors import JobError
from spotbatch.input_access import InputPolicy
from spotbatch.inputs import InputLimits, RowReader, open_input
from spotbatch.jobs import InlineInputs, Job, UriInputs
from spotbatch.workers.batcher import PendingJob
from spotbatch.workers.parts import PartFeed, PartPlanner
from spotbatch.workers.sinks import ParquetSink
from spotbatch.workers.versions import Served, Versions

__all__ = ["Intake"]


class Intake:
    """Checks a parsed job against this worker (model version, output prefix, params, rows).

    ``needs_io`` tells the owner thread whether ``build`` reads a file, so that it
    can run it on the I/O pool instead of stalling the consumer loop.
    """

    def __init__(self, versions: Versions, sink: ParquetSink, planner: PartPlanner, *,
                 inputs: InputPolicy | None = None, limits: InputLimits | None = None) -> None:
        self._versions = versions
        self._sink = sink
        self._inputs = inputs or InputPolicy(())  # none: URI jobs are refused
        self._limits = limits or InputLimits()
        self._planner = planner

    @staticmethod
    def needs_io(job: Job) -> bool:
        return not isinstance(job.inputs, InlineInputs)

    def check(self, job: Job) -> tuple[str, dict[str, Any], Served]:
        """Cheap checks done before any I/O: model version, params, output location."""
        served = self._versions.route(job)
        try:
            params = self._handler(served).check_params(job.params)
        except ValueError as exc:
            raise JobError("invalid_job", f"params: {exc}") from None
        return self._sink.output_uri(job.job_id, job.output), params, served

    def _handler(self, served: Served) -> Any:
        return self._versions.model_for(served).handler

    def output_of(self, job: Job) -> str:
        """Where the job's result lives: its Parquet file, or the folder of its parts."""
        if self.needs_io(job):
            return self._sink.folder_uri(job.job_id, job.output)
        return self._sink.output_uri(job.job_id, job.output)

    def build(self, job: Job, record: Any, epoch: int, *, lookup: bool = True) -> list[PendingJob] | PartFeed:
        """The job's work: one unit for an inline job, the feed of its unfinished parts
        for a URI job.

        Runs on the I/O pool (an inline job with ``lookup=False`` does no I/O). An empty list means the job is already complete: a
        redelivered job whose output a previous owner made durable but could not commit
        (killed first, or held back by an unfinished job earlier in the partition).
        Job ids name outputs, so an existing output is this job's result, unless another
        version than the one the job routes to now wrote it (a rollout's repair): then
        the job runs again and replaces it.
        """
        output_uri, params, served = self.check(job)
        handler = self._handler(served)
        if self.needs_io(job):
            return self._feed(job, record, params, epoch, served) or []
        if lookup and self._written_by(output_uri, served):  # lookup=False: no owner took it up
            return []
        ids, values = self._inline_rows(job, handler)
        self.check_rows(ids, values, handler)
        unit = PendingJob(job, record, ids, values, output_uri, params, epoch=epoch, served=served)
        shadow = self._versions.shadow_of(served)
        if shadow is not None:  # the challenger runs the same rows; compared, never written
            unit.shadow = PendingJob(job, record, ids, values, output_uri, params, epoch=epoch, served=shadow,
                                     shadow_of=unit)
        return [unit]

    def _written_by(self, output_uri: str, served: Served) -> bool:
        """Does the job's output exist, written by what serves it now? A built-in model
        takes any output as its own: one existence check (a HEAD on S3), no read."""
        if served.version is None:
            return self._sink.exists(output_uri)
        return served.wrote(self._sink.metadata_of(output_uri))

    def check_rows(self, ids: list[str], values: list[Any], handler: Any) -> None:
        rows_ok = getattr(handler, "rows_ok", None)
        if rows_ok is not None and rows_ok(values):
            return
        for row_id, value in zip(ids, values):
            try:
                handler.check_row(value)
            except ValueError as exc:
                raise JobError("row_rejected", f"row {row_id!r}: {exc}") from None

    def _feed(self, job: Job, record: Any, params: dict, epoch: int, served: Served) -> PartFeed | None:
        handler = self._handler(served)
        reader = self._open(job, handler)
        try:
            rows = reader.count()
            if not rows:
                raise JobError("input_invalid", f"{cast(UriInputs, job.inputs).uri} has no rows")
            feed = self._planner.plan(job, record, reader, rows, params, epoch,
                                      lambda ids, values: self.check_rows(ids, values, handler), served=served)
        except BaseException:
            reader.close()
            raise
        if feed is None:
            reader.close()
        return feed

    def _open(self, job: Job, handler: Any) -> RowReader:
        inputs = cast(UriInputs, job.inputs)  # needs_io(job): a URI job
        uri = self._inputs.resolve(inputs.uri)  # before any byte is read
        return open_input(uri, id_column=inputs.id_column, input_column=inputs.input_column or handler.input_column,
                          limits=self._limits)

    @staticmethod
    def _inline_rows(job: Job, handler: Any) -> tuple[list[str], list[Any]]:
        column, rows = handler.input_column, cast(InlineInputs, job.inputs).rows
        try:
            values = [row[column] for row in rows]
        except KeyError:
            i = next(i for i, row in enumerate(rows) if column not in row)
            raise JobError("invalid_job", f"inputs.rows.{i}: missing the model's input column {column!r}") from None
        return [row["id"] for row in rows], values

