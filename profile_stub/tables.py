"""The tables profile_stub owns. Every row belongs to a sandbox."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

from carillon_chassis.database import Migration


class ProfileBase(SQLModel, registry=registry()):
    """Base of profile_stub's tables, with its own metadata (no other service's tables)."""


class ProfileRow(ProfileBase, table=True):
    """One person's thin profile."""

    __tablename__ = "profiles"
    sandbox: str = Field(primary_key=True, max_length=30)
    profile_id: str = Field(primary_key=True, max_length=63)
    first_name: str = ""
    last_name: str = ""
    locale: str = ""
    time_zone: str = ""
    create_time: datetime = Field(sa_type=sa.DateTime(timezone=True))
    update_time: datetime = Field(sa_type=sa.DateTime(timezone=True))


class IdentityRow(ProfileBase, table=True):
    """One identity of a profile; an identity belongs to at most one profile per sandbox."""

    __tablename__ = "profile_identities"
    sandbox: str = Field(primary_key=True, max_length=30)
    namespace: str = Field(primary_key=True, max_length=63)
    value: str = Field(primary_key=True, max_length=320)
    profile_id: str = Field(max_length=63, index=True)


class ConsentRow(ProfileBase, table=True):
    """The consent of one profile on one channel."""

    __tablename__ = "consents"
    sandbox: str = Field(primary_key=True, max_length=30)
    profile_id: str = Field(primary_key=True, max_length=63)
    channel: str = Field(primary_key=True, max_length=20)
    state: str = Field(max_length=20)
    source: str = ""
    update_time: datetime = Field(sa_type=sa.DateTime(timezone=True))


class CommunicationRow(ProfileBase, table=True):
    """One message sent, keyed by the delivery ledger's message id."""

    __tablename__ = "communications"
    sandbox: str = Field(primary_key=True, max_length=30)
    message_id: str = Field(primary_key=True, max_length=120)
    profile_id: str = Field(max_length=63, index=True)
    channel: str = Field(max_length=20)
    category: str = Field(max_length=20)
    campaign: str = ""
    run: str = ""
    activity: str = ""
    send_time: datetime = Field(sa_type=sa.DateTime(timezone=True))


def _initial(conn: sa.Connection) -> None:
    ProfileBase.metadata.create_all(conn)


MIGRATIONS = [Migration(1, "profiles, identities, consents, communications", _initial)]
