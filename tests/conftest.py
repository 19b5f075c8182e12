"""Fixtures shared by every test: a database per backend (SQLite and PostgreSQL).

``database_url`` is parametrized over both backends, so every test that uses it (directly or
through ``make_database``) runs on SQLite and on PostgreSQL. PostgreSQL comes from
``CARILLON_TEST_POSTGRES_URL`` (default: the local server's ``test`` database); each test gets a
fresh schema, dropped afterwards. A PostgreSQL server that is down fails these tests: it is never a
silent skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from carillon_chassis.database import Database

POSTGRES_URL = os.environ.get("CARILLON_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


class DatabaseFactory:
    """Creates databases of one backend for a test and removes them afterwards."""

    def __init__(self, backend: str, tmp_path: Path) -> None:
        self.backend = backend
        self.tmp_path = tmp_path
        self.created: list[Database] = []
        self.schemas: list[str] = []

    def url_and_schema(self, service: str) -> tuple[str, str | None]:
        """A URL (and PostgreSQL schema) for a fresh database of ``service``."""
        if self.backend == "sqlite":
            return f"sqlite:///{self.tmp_path / f'{service}.db'}", None
        schema = f"t_{service}_{uuid.uuid4().hex[:10]}"
        self.schemas.append(schema)
        return POSTGRES_URL, schema

    def __call__(self, service: str) -> Database:
        url, schema = self.url_and_schema(service)
        database = Database(url, schema=schema, threads=4)
        self.created.append(database)
        return database

    def cleanup(self) -> None:
        for database in self.created:
            database.close()
        if self.schemas:
            engine = sa.create_engine(POSTGRES_URL, poolclass=sa.pool.NullPool)
            with engine.begin() as conn:
                for schema in self.schemas:
                    conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            engine.dispose()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The database backend of this test instance: "sqlite" or "postgresql"."""
    return str(request.param)


@pytest.fixture
def make_database(backend: str, tmp_path: Path) -> Iterator[Callable[[str], Database]]:
    """A factory of fresh service databases on this test's backend, cleaned up afterwards."""
    factory = DatabaseFactory(backend, tmp_path)
    yield factory
    factory.cleanup()


@pytest.fixture
def database_factory(backend: str, tmp_path: Path) -> Iterator[DatabaseFactory]:
    """The factory itself, for tests that need URLs and schemas (to configure real servers)."""
    factory = DatabaseFactory(backend, tmp_path)
    yield factory
    factory.cleanup()
