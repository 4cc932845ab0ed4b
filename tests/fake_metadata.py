"""The fake cloud metadata servers live in the package (the demo uses them too)."""

from spotbatch.fake_metadata import *  # noqa: F401,F403
from spotbatch.fake_metadata import __all__  # noqa: F401
