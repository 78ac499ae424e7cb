from __future__ import annotations

import pytest

from tests.peers import Pacs, RouterProcess


@pytest.fixture
def pacs_factory(tmp_path):
    started: list[Pacs] = []

    def make(**kwargs) -> Pacs:
        name = kwargs.pop("name", f"pacs{len(started)}")
        pacs = Pacs(tmp_path / name, **kwargs).start()
        started.append(pacs)
        return pacs

    yield make
    for pacs in started:
        pacs.stop()


@pytest.fixture
def pacs(pacs_factory) -> Pacs:
    return pacs_factory()


@pytest.fixture
def router_factory(tmp_path):
    started: list[RouterProcess] = []

    def make(destinations, **kwargs) -> RouterProcess:
        workdir = tmp_path / f"router{len(started)}"
        workdir.mkdir()
        router = RouterProcess(workdir, destinations, **kwargs)
        started.append(router)
        return router.start()

    yield make
    for router in started:
        router.kill()
