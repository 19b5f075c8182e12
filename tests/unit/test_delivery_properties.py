"""Property: whatever the verdicts, only allowed recipients get a message and every other one is in the
ledger with its reason (hypothesis over random verdicts, batches and replays, with the fake gateway).

The verdicts themselves (consent, quarantine, caps) are profile_stub's; this checks that the worker
obeys them at send time, batch after batch, including on replay.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carillon_chassis.database import Database
from delivery_svc.eligibility import ProfileView, Verdict
from delivery_svc.ledger import Ledger
from delivery_svc.pipeline import SKIP_REASONS, DeliveryPipeline, Recipient
from delivery_svc.providers import RetryPolicy
from delivery_svc.tables import MIGRATIONS
from delivery_svc.templates import Template, TemplateStore
from tests.unit.test_delivery_pipeline import HEADER, SANDBOX, FakeGateway, FakeProvider

VERDICTS = ["allowed", *SKIP_REASONS]

people = st.lists(
    st.tuples(st.integers(min_value=0, max_value=30), st.sampled_from(VERDICTS), st.sampled_from(["", "b1", "b2"])),
    min_size=1,
    max_size=40,
)


async def run(recipients: list[tuple[int, str, str]], batch_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        database = Database(f"sqlite:///{Path(tmp) / 'd.db'}", threads=2)
        try:
            database.migrate(MIGRATIONS)
            templates = TemplateStore(database)
            templates.create(
                SANDBOX,
                "welcome",
                Template("", "email", "email", {"subject": "Hi", "text_body": "{{ target.get('k', '') }}"}),
            )
            gateway, provider, ledger = FakeGateway(), FakeProvider(), Ledger(database)
            verdict_of: dict[int, str] = {}
            for person, verdict, _ in recipients:
                verdict_of.setdefault(person, verdict)
            for person, verdict in verdict_of.items():
                address = f"p{person}@example.com"
                view = ProfileView(profile_id=f"p{person}", identities=(("email", address),))
                gateway.verdicts[("email", address)] = Verdict(
                    ("email", address), verdict, view if verdict != "unknown_profile" else None, address
                )
            pipeline = DeliveryPipeline(
                database=database,
                templates=templates,
                ledger=ledger,
                gateway=gateway,
                provider=provider,
                channel="email",
                max_batch=100,
                sender_name="C",
                sender_address="c@example.com",
                retry=RetryPolicy(attempts=1, initial_s=0, max_s=0),
            )
            batch = [Recipient("email", f"p{p}@example.com", key) for p, _, key in recipients]
            for _replay in range(2):
                session = await pipeline.open(SANDBOX, HEADER)
                for start in range(0, len(batch), batch_size):
                    await session.deliver(start, batch[start : start + batch_size])

            sent = Counter((m.recipient, m.message_id) for m in provider.sent)
            expected = {(f"p{p}@example.com", key) for p, v, key in recipients if verdict_of[p] == "allowed"}
            assert all(n == 1 for n in sent.values())
            assert {r for r, _ in sent} == {a for a, _ in expected}
            assert len(sent) == len(expected)
            rows = ledger.entries(SANDBOX, HEADER.run, HEADER.activity)
            for row in rows:
                person = int(row.profile_key.split("@")[0].removeprefix("email:p").removeprefix("p"))
                verdict = verdict_of[person]
                if verdict == "allowed":
                    assert (row.status, row.reason) == ("sent", "")
                else:
                    assert (row.status, row.reason) == ("skipped", SKIP_REASONS[verdict])
            assert len(rows) == len({(p, key) for p, _, key in recipients})
        finally:
            database.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipients=people, batch_size=st.integers(min_value=1, max_value=40))
def test_only_allowed_recipients_get_a_message_and_every_skip_has_its_reason(
    recipients: list[tuple[int, str, str]], batch_size: int
) -> None:
    asyncio.run(run(recipients, batch_size))
