"""Shared test set-up: offline, and one Prefect test harness per session."""

from __future__ import annotations

import os

# Nothing may try a model hub during tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A `gear` started by a test without PREFECT_API_URL leaves no Prefect server behind:
# the shared local API stops as soon as no `gear` uses it (flows/local_api.py: LocalApi).
os.environ.setdefault("GEAR_API_IDLE_SECONDS", "0")

import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API and database for tests that run flows (~10 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def embedded_plain_xml(tmp_path_factory):
    """The embedded dump decompressed: an uncompressed UTF-8 .xml export."""
    import bz2

    from tasks.assets import embedded_dump_path

    path = tmp_path_factory.mktemp("plain-dump") / "enwiki-excerpt.xml"
    path.write_bytes(bz2.decompress(embedded_dump_path().read_bytes()))
    return path
