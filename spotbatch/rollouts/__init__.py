"""Model versions and rollouts: the registry on a compacted Kafka topic, digests, routing.

The registry (``registry``) stores immutable numbered versions and moving aliases in
the models topic (default ``spotbatch.models``, ``cleanup.policy=compact``); each record
is keyed so compaction keeps the latest state of every version and alias. ``digest``
hashes the files a ref loads; ``routing`` maps a job id to a stable slice. ``controller``
drives a rollout through its steps while ``gates`` hold (stats from ``observe``), and
``repair`` re-publishes the jobs a bad version wrote; ``service`` ticks them all.
"""

from spotbatch.rollouts.digest import digest_of_ref
from spotbatch.rollouts.records import ModelVersion, RegistryState, parse_model_ref
from spotbatch.rollouts.registry import Registry, RegistryError
from spotbatch.rollouts.routing import bucket_of, routes_to_challenger

__all__ = ["ModelVersion", "RegistryState", "Registry", "RegistryError", "digest_of_ref", "parse_model_ref",
           "bucket_of", "routes_to_challenger"]
