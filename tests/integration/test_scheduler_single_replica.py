"""On SQLite one scheduler replica per database: a second one is refused at start-up, and the lock
is free again once the first has stopped."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler_svc.app import build_server
from scheduler_svc.settings import SchedulerSettings
from scheduler_svc.single_replica import ReplicaLockError


def settings(tmp_path: Path) -> SchedulerSettings:
    return SchedulerSettings(port=0, database_url=f"sqlite:///{tmp_path / 'scheduler.db'}", poll_interval_s=0.05)


async def test_a_second_scheduler_on_the_same_sqlite_database_is_refused(tmp_path: Path) -> None:
    first = await build_server(settings(tmp_path))
    await first.start()
    try:
        with pytest.raises(ReplicaLockError):
            await build_server(settings(tmp_path))
    finally:
        await first.stop(0)

    again = await build_server(settings(tmp_path))
    await again.start()
    await again.stop(0)


async def test_schedulers_on_different_sqlite_databases_run_side_by_side(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    servers = [await build_server(settings(tmp_path / name)) for name in ("a", "b")]
    for server in servers:
        await server.start()
    for server in servers:
        await server.stop(0)
