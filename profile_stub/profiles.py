"""Profiles, consent, communication history and eligibility: profile_stub's domain.

Plain synchronous Python over SQLAlchemy; the servicer runs it on the database worker pool.
Channels are the lower-case names ``email``, ``sms``, ``push`` and ``direct_mail``; consent states are
``opted_in``, ``opted_out`` and ``unknown``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa

from carillon_chassis.database import Database, as_utc, utcnow
from carillon_chassis.errors import FieldViolation, InvalidArgument, NotFound
from carillon_chassis.names import validate_id
from profile_stub.tables import CommunicationRow, ConsentRow, IdentityRow, ProfileRow

CHANNELS = ("email", "sms", "push", "direct_mail")
CONSENT_STATES = ("opted_in", "opted_out", "unknown")
# The identity namespace that holds a profile's address on each channel.
ADDRESS_NAMESPACE = {"email": "email", "sms": "phone", "push": "push_token", "direct_mail": "postal_address"}
_CHUNK = 500


@dataclass
class Consent:
    """Consent on one channel."""

    channel: str
    state: str
    source: str = ""
    update_time: datetime | None = None


@dataclass
class Profile:
    """A thin profile as the domain sees it."""

    profile_id: str
    identities: list[tuple[str, str]] = field(default_factory=list)
    first_name: str = ""
    last_name: str = ""
    locale: str = ""
    time_zone: str = ""
    consents: list[Consent] = field(default_factory=list)
    create_time: datetime | None = None
    update_time: datetime | None = None

    def address(self, channel: str) -> str | None:
        """The profile's address on ``channel``, if it has one."""
        namespace = ADDRESS_NAMESPACE[channel]
        return next((value for ns, value in self.identities if ns == namespace and value), None)

    def consent(self, channel: str) -> str:
        """The consent state on ``channel`` (``unknown`` when none is recorded)."""
        return next((c.state for c in self.consents if c.channel == channel), "unknown")


@dataclass
class Eligibility:
    """The verdict for one identity: ``allowed``, ``no_consent``, ``missing_address`` or ``unknown_profile``."""

    identity: tuple[str, str]
    verdict: str
    profile: Profile | None = None
    address: str = ""


@dataclass
class Communication:
    """One message sent to a profile."""

    message_id: str
    profile_id: str
    channel: str
    category: str
    campaign: str = ""
    run: str = ""
    activity: str = ""
    send_time: datetime | None = None


def _chunks(items: Sequence[object], size: int = _CHUNK) -> Iterable[Sequence[object]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class ProfileStore:
    """The profile store of one database."""

    def __init__(self, database: Database, *, unknown_consent_allowed: Iterable[str] = ()) -> None:
        self.database = database
        self.unknown_consent_allowed = set(unknown_consent_allowed)

    # -- writes -------------------------------------------------------------------------------
    def upsert_profiles(self, sandbox: str, profiles: Sequence[Profile]) -> tuple[int, int]:
        """Create or replace profiles in one transaction; return (created, updated)."""
        self._validate_profiles(profiles)
        now = utcnow()
        ids = [p.profile_id for p in profiles]
        with self.database.engine.begin() as conn:
            existing: set[str] = set()
            for chunk in _chunks(ids):
                existing.update(
                    conn.execute(
                        sa.select(ProfileRow.profile_id).where(  # type: ignore[call-overload]
                            ProfileRow.sandbox == sandbox,
                            ProfileRow.profile_id.in_(chunk),  # type: ignore[attr-defined]
                        )
                    ).scalars()
                )
            self._check_identity_owners(conn, sandbox, profiles)
            profiles_t = ProfileRow.__table__  # type: ignore[attr-defined]
            identities_t = IdentityRow.__table__  # type: ignore[attr-defined]
            for chunk in _chunks(ids):
                conn.execute(
                    identities_t.delete().where(identities_t.c.sandbox == sandbox, identities_t.c.profile_id.in_(chunk))
                )
            new_rows, changed_rows, identity_rows, consent_rows = [], [], [], []
            for p in profiles:
                row = {
                    "sandbox": sandbox,
                    "profile_id": p.profile_id,
                    "first_name": p.first_name,
                    "last_name": p.last_name,
                    "locale": p.locale,
                    "time_zone": p.time_zone,
                    "update_time": now,
                }
                if p.profile_id in existing:
                    changed_rows.append(row)
                else:
                    new_rows.append({**row, "create_time": now})
                identity_rows += [
                    {"sandbox": sandbox, "namespace": ns, "value": value, "profile_id": p.profile_id}
                    for ns, value in dict.fromkeys(p.identities)
                ]
                consent_rows += [
                    {
                        "sandbox": sandbox,
                        "profile_id": p.profile_id,
                        "channel": c.channel,
                        "state": c.state,
                        "source": c.source,
                        "update_time": now,
                    }
                    for c in p.consents
                ]
            if new_rows:
                conn.execute(profiles_t.insert(), new_rows)
            for row in changed_rows:
                conn.execute(
                    profiles_t.update()
                    .where(profiles_t.c.sandbox == sandbox, profiles_t.c.profile_id == row["profile_id"])
                    .values(**{k: v for k, v in row.items() if k not in ("sandbox", "profile_id")})
                )
            if identity_rows:
                conn.execute(identities_t.insert(), identity_rows)
            for row in consent_rows:
                self._write_consent(conn, row)
        return len(new_rows), len(changed_rows)

    def set_consent(self, sandbox: str, profile_id: str, channel: str, state: str, source: str) -> Profile:
        """Set one profile's consent on one channel and return the profile."""
        validate_id(profile_id, "profile")
        if channel not in CHANNELS:
            raise InvalidArgument("channel must be set", field="channel")
        if state not in CONSENT_STATES:
            raise InvalidArgument("state must be set", field="state")
        with self.database.engine.begin() as conn:
            self._require_profile(conn, sandbox, profile_id, "profile")
            self._write_consent(
                conn,
                {
                    "sandbox": sandbox,
                    "profile_id": profile_id,
                    "channel": channel,
                    "state": state,
                    "source": source,
                    "update_time": utcnow(),
                },
            )
        return self.get_profile(sandbox, profile_id)

    def record_communications(self, sandbox: str, communications: Sequence[Communication]) -> int:
        """Record sent messages; a message id already recorded is skipped. Returns how many were new."""
        violations = [
            FieldViolation(f"communications[{i}].message_id", "message_id must be set")
            for i, c in enumerate(communications)
            if not c.message_id
        ]
        violations += [
            FieldViolation(f"communications[{i}].channel", "channel must be set")
            for i, c in enumerate(communications)
            if c.channel not in CHANNELS
        ]
        if violations:
            raise InvalidArgument("invalid communications", violations=violations)
        table = CommunicationRow.__table__  # type: ignore[attr-defined]
        with self.database.engine.begin() as conn:
            known_profiles: set[str] = set()
            wanted = list(dict.fromkeys(c.profile_id for c in communications))
            for chunk in _chunks(wanted):
                known_profiles.update(
                    conn.execute(
                        sa.select(ProfileRow.profile_id).where(  # type: ignore[call-overload]
                            ProfileRow.sandbox == sandbox,
                            ProfileRow.profile_id.in_(chunk),  # type: ignore[attr-defined]
                        )
                    ).scalars()
                )
            missing = [i for i, c in enumerate(communications) if c.profile_id not in known_profiles]
            if missing:
                raise NotFound(
                    "unknown profile",
                    violations=[FieldViolation(f"communications[{i}].profile", "no such profile") for i in missing],
                )
            seen: set[str] = set()
            ids = [c.message_id for c in communications]
            for chunk in _chunks(ids):
                seen.update(
                    conn.execute(
                        sa.select(table.c.message_id).where(table.c.sandbox == sandbox, table.c.message_id.in_(chunk))
                    ).scalars()
                )
            rows = []
            for c in communications:
                if c.message_id in seen:
                    continue
                seen.add(c.message_id)
                rows.append(
                    {
                        "sandbox": sandbox,
                        "message_id": c.message_id,
                        "profile_id": c.profile_id,
                        "channel": c.channel,
                        "category": c.category,
                        "campaign": c.campaign,
                        "run": c.run,
                        "activity": c.activity,
                        "send_time": c.send_time or utcnow(),
                    }
                )
            if rows:
                conn.execute(table.insert(), rows)
        return len(rows)

    # -- reads --------------------------------------------------------------------------------
    def get_profile(self, sandbox: str, profile_id: str) -> Profile:
        """One profile with its identities and consents."""
        validate_id(profile_id, "name")
        with self.database.engine.connect() as conn:
            found = self._load_profiles(conn, sandbox, [profile_id])
        if profile_id not in found:
            raise NotFound(f"profile {profile_id!r} does not exist", field="name", reason="PROFILE_NOT_FOUND")
        return found[profile_id]

    def history(self, sandbox: str, profile_id: str) -> list[Communication]:
        """The communication history of one profile, oldest first."""
        table = CommunicationRow.__table__  # type: ignore[attr-defined]
        with self.database.engine.connect() as conn:
            rows = conn.execute(
                sa.select(table)
                .where(table.c.sandbox == sandbox, table.c.profile_id == profile_id)
                .order_by(table.c.send_time, table.c.message_id)
            ).mappings()
            return [
                Communication(
                    message_id=r["message_id"],
                    profile_id=r["profile_id"],
                    channel=r["channel"],
                    category=r["category"],
                    campaign=r["campaign"],
                    run=r["run"],
                    activity=r["activity"],
                    send_time=as_utc(r["send_time"]),
                )
                for r in rows
            ]

    def check_eligibility(
        self, sandbox: str, channel: str, category: str, identities: Sequence[tuple[str, str]]
    ) -> list[Eligibility]:
        """The verdict for each identity, in order, for a message of ``channel`` and ``category``."""
        if channel not in CHANNELS:
            raise InvalidArgument("channel must be set", field="channel")
        if category not in ("marketing", "transactional"):
            raise InvalidArgument("category must be set", field="category")
        for i, (namespace, value) in enumerate(identities):
            if not namespace or not value:
                raise InvalidArgument(
                    "identities need a namespace and a value", field=f"identities[{i}]", reason="INVALID_IDENTITY"
                )
        identity_t = IdentityRow.__table__  # type: ignore[attr-defined]
        owners: dict[tuple[str, str], str] = {}
        with self.database.engine.connect() as conn:
            by_namespace: dict[str, list[str]] = {}
            for namespace, value in identities:
                by_namespace.setdefault(namespace, []).append(value)
            for namespace, values in by_namespace.items():
                for chunk in _chunks(list(dict.fromkeys(values))):
                    for ns, value, pid in conn.execute(
                        sa.select(identity_t.c.namespace, identity_t.c.value, identity_t.c.profile_id).where(
                            identity_t.c.sandbox == sandbox,
                            identity_t.c.namespace == namespace,
                            identity_t.c.value.in_(chunk),
                        )
                    ):
                        owners[(ns, value)] = pid
            profiles = self._load_profiles(conn, sandbox, list(dict.fromkeys(owners.values())))
        results = []
        for ident in identities:
            profile = profiles.get(owners.get(ident, ""))
            if profile is None:
                results.append(Eligibility(ident, "unknown_profile"))
                continue
            address = profile.address(channel)
            if not address:
                results.append(Eligibility(ident, "missing_address", profile))
                continue
            if category == "marketing":
                consent = profile.consent(channel)
                allowed = consent == "opted_in" or (consent == "unknown" and channel in self.unknown_consent_allowed)
                if not allowed:
                    results.append(Eligibility(ident, "no_consent", profile))
                    continue
            results.append(Eligibility(ident, "allowed", profile, address))
        return results

    # -- helpers ------------------------------------------------------------------------------
    def _validate_profiles(self, profiles: Sequence[Profile]) -> None:
        violations: list[FieldViolation] = []
        seen: dict[str, int] = {}
        for i, p in enumerate(profiles):
            try:
                validate_id(p.profile_id, f"profiles[{i}].name")
            except InvalidArgument as exc:
                violations += exc.violations
            if p.profile_id in seen:
                violations.append(FieldViolation(f"profiles[{i}].name", f"repeats profiles[{seen[p.profile_id]}]"))
            seen.setdefault(p.profile_id, i)
            for j, (namespace, value) in enumerate(p.identities):
                if not namespace or not value:
                    violations.append(
                        FieldViolation(f"profiles[{i}].identities[{j}]", "an identity needs a namespace and a value")
                    )
            for j, consent in enumerate(p.consents):
                if consent.channel not in CHANNELS:
                    violations.append(FieldViolation(f"profiles[{i}].consents[{j}].channel", "channel must be set"))
                if consent.state not in CONSENT_STATES:
                    violations.append(FieldViolation(f"profiles[{i}].consents[{j}].state", "state must be set"))
        if violations:
            raise InvalidArgument("invalid profiles", violations=violations, reason="INVALID_PROFILE")

    def _check_identity_owners(self, conn: sa.Connection, sandbox: str, profiles: Sequence[Profile]) -> None:
        identity_t = IdentityRow.__table__  # type: ignore[attr-defined]
        claimed: dict[tuple[str, str], tuple[int, int, str]] = {}
        violations: list[FieldViolation] = []
        for i, p in enumerate(profiles):
            for j, ident in enumerate(p.identities):
                other = claimed.get(ident)
                if other is not None and other[2] != p.profile_id:
                    violations.append(
                        FieldViolation(f"profiles[{i}].identities[{j}]", f"also claimed by profiles[{other[0]}]")
                    )
                claimed.setdefault(ident, (i, j, p.profile_id))
        for (namespace, value), (i, j, pid) in claimed.items():
            owner = conn.execute(
                sa.select(identity_t.c.profile_id).where(
                    identity_t.c.sandbox == sandbox, identity_t.c.namespace == namespace, identity_t.c.value == value
                )
            ).scalar()
            if owner is not None and owner != pid:
                violations.append(
                    FieldViolation(f"profiles[{i}].identities[{j}]", f"belongs to profile {owner!r} already")
                )
        if violations:
            raise InvalidArgument("identity conflict", violations=violations, reason="IDENTITY_CONFLICT")

    def _require_profile(self, conn: sa.Connection, sandbox: str, profile_id: str, field_name: str) -> None:
        exists = conn.execute(
            sa.select(ProfileRow.profile_id).where(  # type: ignore[call-overload]
                ProfileRow.sandbox == sandbox, ProfileRow.profile_id == profile_id
            )
        ).scalar()
        if exists is None:
            raise NotFound(f"profile {profile_id!r} does not exist", field=field_name, reason="PROFILE_NOT_FOUND")

    @staticmethod
    def _write_consent(conn: sa.Connection, row: dict[str, object]) -> None:
        table = ConsentRow.__table__  # type: ignore[attr-defined]
        updated = conn.execute(
            table.update()
            .where(
                table.c.sandbox == row["sandbox"],
                table.c.profile_id == row["profile_id"],
                table.c.channel == row["channel"],
            )
            .values(state=row["state"], source=row["source"], update_time=row["update_time"])
        )
        if updated.rowcount == 0:
            conn.execute(table.insert().values(**row))

    @staticmethod
    def _load_profiles(conn: sa.Connection, sandbox: str, ids: Sequence[str]) -> dict[str, Profile]:
        profiles_t = ProfileRow.__table__  # type: ignore[attr-defined]
        identity_t = IdentityRow.__table__  # type: ignore[attr-defined]
        consents_t = ConsentRow.__table__  # type: ignore[attr-defined]
        found: dict[str, Profile] = {}
        for chunk in _chunks(list(ids)):
            for r in conn.execute(
                sa.select(profiles_t).where(profiles_t.c.sandbox == sandbox, profiles_t.c.profile_id.in_(chunk))
            ).mappings():
                found[r["profile_id"]] = Profile(
                    profile_id=r["profile_id"],
                    first_name=r["first_name"],
                    last_name=r["last_name"],
                    locale=r["locale"],
                    time_zone=r["time_zone"],
                    create_time=as_utc(r["create_time"]),
                    update_time=as_utc(r["update_time"]),
                )
            for ns, value, pid in conn.execute(
                sa.select(identity_t.c.namespace, identity_t.c.value, identity_t.c.profile_id)
                .where(identity_t.c.sandbox == sandbox, identity_t.c.profile_id.in_(chunk))
                .order_by(identity_t.c.namespace, identity_t.c.value)
            ):
                found[pid].identities.append((ns, value))
            for r in conn.execute(
                sa.select(consents_t)
                .where(consents_t.c.sandbox == sandbox, consents_t.c.profile_id.in_(chunk))
                .order_by(consents_t.c.channel)
            ).mappings():
                found[r["profile_id"]].consents.append(
                    Consent(r["channel"], r["state"], r["source"], as_utc(r["update_time"]))
                )
        return found
