"""Test doubles users may reuse in their own tests, kept out of the product modules.

- ``spotbatch.testing.metadata``: fake AWS / GCP / Azure metadata servers (real HTTP on
  loopback) that serve spot notices on demand (the demo uses them too).
- ``spotbatch.testing.store``: ``MemoryStore``, an in-memory ObjectStore.
- ``spotbatch.testing.broker``: an in-memory broker behind the worker's broker seam.

Each is imported from its module (``from spotbatch.testing.metadata import FakeAws``),
so importing this package loads nothing.
"""

__all__: list[str] = []
