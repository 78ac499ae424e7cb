"""The concurrent.futures workaround in router.compat.futures: a test that fails when the
standard library changes what it relies on or offers what it works around."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

from router.compat.futures import manager_thread, worker_processes


def _pid() -> int:
    import os

    return os.getpid()


def test_upstream_still_keeps_its_workers_in_a_private_mapping_and_has_no_kill():
    pool = ProcessPoolExecutor(max_workers=1)
    try:
        pid = pool.submit(_pid).result(timeout=60)
        assert isinstance(pool._processes, dict)
        assert [p.pid for p in worker_processes(pool)] == [pid]
        # Python 3.14 adds ProcessPoolExecutor.kill_workers(): use it then instead
        assert not hasattr(pool, "kill_workers")
    finally:
        pool.shutdown()


def test_upstream_still_has_a_manager_thread_that_joins_the_workers_after_shutdown():
    pool = ProcessPoolExecutor(max_workers=1)
    pool.submit(_pid).result(timeout=60)
    workers = worker_processes(pool)
    manager = manager_thread(pool)
    assert manager is not None and manager.is_alive()
    pool.shutdown(wait=False)
    manager.join(30)
    assert not manager.is_alive()
    assert workers and all(p.exitcode is not None for p in workers)
