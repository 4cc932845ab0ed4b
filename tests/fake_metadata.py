"""The fake cloud metadata servers live in spotbatch.testing.metadata (the demo uses them too)."""

from spotbatch.testing.metadata import *  # noqa: F401,F403
from spotbatch.testing.metadata import __all__  # noqa: F401
