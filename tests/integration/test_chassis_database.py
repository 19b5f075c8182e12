"""The chassis's PostgreSQL sessions: their settings, from the options a service opens them with."""

from __future__ import annotations

import pytest

from carillon_chassis.database import Database
from tests.conftest import DatabaseFactory


@pytest.mark.parametrize("backend", ["postgresql"])  # session settings are PostgreSQL's
@pytest.mark.parametrize("jit", [True, False])
def test_a_service_database_plans_custom_plans_and_jit_only_when_allowed(
    database_factory: DatabaseFactory, jit: bool
) -> None:
    url, schema = database_factory.url_and_schema("chassis")
    database = Database(url, schema=schema, threads=1, jit=jit)
    try:
        with database.engine.connect() as conn:
            plan_cache_mode, jit_setting = conn.exec_driver_sql(
                "SELECT current_setting('plan_cache_mode'), current_setting('jit')"
            ).one()
    finally:
        database.close()

    assert plan_cache_mode == "force_custom_plan"
    assert jit_setting == ("on" if jit else "off")  # the test server runs with PostgreSQL's default, on
