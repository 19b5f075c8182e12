"""One ingestion stream: its batches applied strictly in order, with the next block staged meanwhile.

Each batch of an ``IngestRecords`` stream is written in its own transaction, in stream order, and a
failed batch ends the stream (the earlier ones stay applied). Within that order a CSV block is
prepared (on PostgreSQL: copied into its staging table and checked, on its own connection) while
the previous batch is still being written, so the two halves of the work overlap; its write starts
only once the previous batch has committed, so it sees that batch's rows exactly as if it ran alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from audience_svc.blocks import PreparedBlock, RecordBlock, discard_block, finish_block, prepare_block
from audience_svc.ingest import IngestResult, RecordChange, apply_changes
from audience_svc.schema import Entity
from carillon_chassis.database import Database
from carillon_chassis.errors import FieldViolation


class IngestStream:
    """The batches of one stream into one entity: their totals and the first ``max_rejections`` problems."""

    def __init__(self, database: Database, entity: Entity, *, max_rejections: int) -> None:
        self.database = database
        self.entity = entity
        self.max_rejections = max_rejections
        self.total = IngestResult()
        # Batches written so far; while a batch fails, also the index of the failing batch.
        self.batches = 0
        self.rejections: list[tuple[int, FieldViolation]] = []
        self._writing: asyncio.Future[IngestResult] | None = None

    async def add_changes(self, changes: Sequence[RecordChange], *, allow_partial: bool) -> None:
        """Write a batch of per-row changes after the batches before it."""
        await self._settle()
        result = await self.database.run(
            apply_changes, self.database, self.entity, changes, allow_partial=allow_partial
        )
        self._count(result)

    async def add_block(self, block: RecordBlock, *, allow_partial: bool) -> None:
        """Prepare a block while the previous batch is written, then start writing it."""
        preparing = asyncio.ensure_future(
            self.database.run(prepare_block, self.database, self.entity, block, allow_partial=allow_partial)
        )
        try:
            await self._settle()
            # shielded: a cancelled stream must not lose a prepared block, which holds a transaction
            prepared = await asyncio.shield(preparing)
        except BaseException:
            await self._drop(preparing)
            raise
        self._writing = asyncio.ensure_future(self.database.run(finish_block, self.database, prepared))

    async def finish(self) -> None:
        """Wait until every batch is written (a failure is raised)."""
        await self._settle()

    async def close(self) -> None:
        """After a failure or a cancelled stream: let a batch being written end, without raising."""
        writing, self._writing = self._writing, None
        if writing is not None:
            await asyncio.wait([writing])
            if not writing.cancelled():
                writing.exception()  # retrieved: the stream already failed for another reason

    async def _settle(self) -> None:
        writing, self._writing = self._writing, None
        if writing is not None:
            self._count(await writing)

    async def _drop(self, preparing: asyncio.Future[PreparedBlock]) -> None:
        await asyncio.wait([preparing])
        if not preparing.cancelled() and preparing.exception() is None:
            await self.database.run(discard_block, preparing.result())

    def _count(self, result: IngestResult) -> None:
        self.total.add(result)
        room = self.max_rejections - len(self.rejections)
        self.rejections.extend((self.batches, violation) for violation in result.rejections[: max(room, 0)])
        self.batches += 1
