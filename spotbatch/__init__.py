"""spotbatch: event-driven batch inference on spot GPUs.

Publish jobs to Kafka (``publish_jobs`` or any producer writing the job JSON), run
``spotbatch worker`` processes in a consumer group, read Parquet outputs.
"""

from spotbatch.errors import JobError
from spotbatch.jobs import Job, parse_job
from spotbatch.publish import PublishReport, publish_jobs, publish_raw, rows_to_jobs

__all__ = ["Job", "JobError", "parse_job", "publish_jobs", "publish_raw", "rows_to_jobs", "PublishReport"]
__version__ = "0.1.0"
