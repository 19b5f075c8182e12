"""Fixtures of the scheduler store tests: a migrated scheduler database and its stores."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from carillon_chassis.database import Database
from scheduler_svc.campaigns import CampaignStore
from scheduler_svc.runs import RunStore
from scheduler_svc.tables import MIGRATIONS


@pytest.fixture
def database(make_database: Callable[[str], Database]) -> Database:
    """A fresh scheduler database on the test's backend, migrated."""
    database = make_database("scheduler")
    database.migrate(MIGRATIONS)
    return database


@pytest.fixture
def campaigns(database: Database) -> CampaignStore:
    """The campaign store over that database."""
    return CampaignStore(database)


@pytest.fixture
def runs(database: Database) -> RunStore:
    """The run store over that database."""
    return RunStore(database)
