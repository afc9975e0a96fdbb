"""The real StudioML client and runner fixtures (tests/runner/conftest.py), for the DAG tests.

Imported rather than listed in ``pytest_plugins``, which pytest allows only in the root conftest.
"""

from __future__ import annotations

from tests.runner.conftest import runner_cache, studio_client, studioml_client  # noqa: F401
