from __future__ import annotations

import pytest

from tests.support.peers import Pacs, RouterProcess


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


# -- PostgreSQL, for the cluster queue backend ------------------------------------------------------
@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """One PostgreSQL server for the session (run as an unprivileged user, on a free port);
    each test that needs one gets a database of its own (`postgres_url`). With
    ROUTER_TEST_POSTGRES_URL set (postgresql://user@host:port/db, a superuser), that server is
    used instead."""
    import os
    from types import SimpleNamespace

    if os.environ.get("ROUTER_TEST_POSTGRES_URL"):
        yield SimpleNamespace(url=os.environ["ROUTER_TEST_POSTGRES_URL"])
        return
    from tests.support.cluster import PostgresServer

    server = PostgresServer(tmp_path_factory.mktemp("postgres"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server, request):
    """A fresh, empty database on the session's server, dropped after the test."""
    import re
    import uuid

    import psycopg

    name = "t_" + re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40] + "_" + uuid.uuid4().hex[:8]
    admin = postgres_server.url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield admin.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- the codec pool the in-process forwarding tests share, one per test module, as `serve` keeps one --
@pytest.fixture(scope="module")
def codec_pool():
    from router.codecs.workers import CodecPool

    pool = CodecPool(workers=2)
    yield pool
    pool.shutdown()
