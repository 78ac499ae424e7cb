"""Fixtures the storage commitment tests share."""

from __future__ import annotations

import pytest

from tests.commitment.test_commitment_relay import Archive


@pytest.fixture
def archives():
    started: list[Archive] = []

    def make(**kwargs) -> Archive:
        archive = Archive(**kwargs).start()
        started.append(archive)
        return archive

    yield make
    for archive in started:
        archive.stop()
