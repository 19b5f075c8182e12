"""Profiles, consent, communication history and eligibility: profile_stub's domain.

Plain synchronous Python over SQLAlchemy; the servicer runs it on the database worker pool.
Channels are the lower-case names ``email``, ``sms``, ``push`` and ``direct_mail``; consent states are
``opted_in``, ``opted_out`` and ``unknown``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from carillon_chassis.database import Database, as_utc, utcnow
from carillon_chassis.errors import AlreadyExists, FieldViolation, InvalidArgument, NotFound
from carillon_chassis.messages import message_id as message_id_of
from carillon_chassis.messages import profile_key
from carillon_chassis.names import new_id, validate_id
from profile_stub import quarantine
from profile_stub.capping import MAX_MESSAGES_LIMIT, PERIODS, TIME_BASES, CappingRule, period_start
from profile_stub.keysets import (
    POSTGRES_CHUNK,
    SQLITE_CHUNK,
    KeyMatch,
    array_of,
    custom_plans,
    delete_per_key,
    fetch_rows,
    insert_rows,
    key_chunks,
    per_key,
    update_per_key,
)
from profile_stub.quarantine import EVENT_KINDS, OPT_OUT_KINDS, DeliveryEvent, Quarantine
from profile_stub.tables import (
    CappingRuleRow,
    CommunicationRow,
    ConsentRow,
    DeliveryEventRow,
    IdentityRow,
    ProfileAttributeRow,
    ProfileCounterRow,
    ProfileRow,
    PurposeConsentRow,
    QuarantineRow,
)

CHANNELS = ("email", "sms", "push", "direct_mail")
CONSENT_STATES = ("opted_in", "opted_out", "unknown")
# The identity namespace that holds a profile's address on each channel.
ADDRESS_NAMESPACE = {"email": "email", "sms": "phone", "push": "push_token", "direct_mail": "postal_address"}
# Names of custom attributes; the country is stored as the attribute "@country".
ATTRIBUTE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_COUNTRY = "@country"
Scalar = None | str | int | Decimal | bool | date | datetime


def encode_scalar(value: Scalar) -> str:
    """Tagged JSON of a scalar, so that its type survives the round trip."""
    if value is None:
        return json.dumps(["null", None])
    if isinstance(value, bool):
        return json.dumps(["bool", value])
    if isinstance(value, int):
        return json.dumps(["int", value])
    if isinstance(value, Decimal):
        return json.dumps(["decimal", format(value, "f")])
    if isinstance(value, datetime):
        return json.dumps(["timestamp", value.isoformat()])
    if isinstance(value, date):
        return json.dumps(["date", value.isoformat()])
    return json.dumps(["string", str(value)])


def decode_scalar(text: str) -> Scalar:
    """The scalar of tagged JSON written by ``encode_scalar``."""
    kind, raw = json.loads(text)
    if kind == "decimal":
        return Decimal(raw)
    if kind == "timestamp":
        return datetime.fromisoformat(raw)
    if kind == "date":
        return date.fromisoformat(raw)
    result: Scalar = raw
    return result


@dataclass
class Consent:
    """Consent on one channel."""

    channel: str
    state: str
    source: str = ""
    update_time: datetime | None = None
    purpose: str = "marketing"


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
    country: str = ""
    attributes: dict[str, Scalar] = field(default_factory=dict)
    create_time: datetime | None = None
    update_time: datetime | None = None

    def address(self, channel: str) -> str | None:
        """The profile's address on ``channel``, if it has one."""
        namespace = ADDRESS_NAMESPACE[channel]
        return next((value for ns, value in self.identities if ns == namespace and value), None)

    def addresses(self, channel: str) -> list[str]:
        """Every address of the profile on ``channel`` (several push tokens, for example)."""
        namespace = ADDRESS_NAMESPACE[channel]
        return [value for ns, value in self.identities if ns == namespace and value]

    def consent(self, channel: str, purpose: str = "marketing") -> str:
        """The consent state on ``channel`` for ``purpose`` (``unknown`` when none is recorded)."""
        return next((c.state for c in self.consents if c.channel == channel and c.purpose == purpose), "unknown")


@dataclass
class Eligibility:
    """The verdict for one identity: ``allowed``, ``no_consent``, ``quarantined``, ``capped``,
    ``missing_address`` or ``unknown_profile``; ``reserved`` when an allowed send was reserved."""

    identity: tuple[str, str]
    verdict: str
    profile: Profile | None = None
    address: str = ""
    reserved: bool = False
    # When allowed: every usable (not quarantined) address on the channel; ``address`` is the first.
    addresses: list[str] = field(default_factory=list)
    # When reserved: the message id the reservation is held under.
    message_id: str = ""


@dataclass(frozen=True)
class MessageKeys:
    """What the message ids of a reservation are derived from, as the delivery ledger derives them
    (:func:`carillon_chassis.messages.message_id`): the run, the activity and one entity key per identity."""

    run: str
    activity: str
    entity_keys: Sequence[str]


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


def _slices(conn: sa.Connection, keys: Sequence[str]) -> Iterator[Sequence[str]]:
    """``keys`` in slices of one statement each on this connection's backend."""
    return key_chunks(keys, conn.dialect.name == "postgresql")


def _profile_rows(
    conn: sa.Connection, sandbox: str, ids: Sequence[str], columns: Sequence[str], *, lock: bool = False
) -> Sequence[Sequence[Any]]:
    """``columns`` of the profiles of ``ids`` that exist, one primary-key probe per id (:func:`per_key`).
    With ``lock`` (PostgreSQL), each row is locked as it is read (``FOR NO KEY UPDATE``, held to commit),
    in the order of ``ids`` (sorted by the caller: no deadlocks between reservers), so that the reservers
    of a profile serialize while readers never wait. (A counter row per profile, inserted when missing and
    then locked, cost two statements, an index probe and, at a profile's first send, a row insert more per
    profile.) A profile deleted meanwhile has no row, and is judged unknown."""
    profiles_t = ProfileRow.__table__  # type: ignore[attr-defined]

    def query(match: KeyMatch) -> sa.Select[Any]:
        select = sa.select(*(profiles_t.c[name] for name in columns)).where(
            profiles_t.c.sandbox == sandbox, match(profiles_t.c.profile_id)
        )
        return select.with_for_update(key_share=True) if lock else select

    return fetch_rows(conn, per_key(conn, ids, query, unique=True))


def _communication_from_row(r: sa.RowMapping) -> Communication:
    """A Communication from a row of the communications table."""
    return Communication(
        message_id=r["message_id"],
        profile_id=r["profile_id"],
        channel=r["channel"],
        category=r["category"],
        campaign=r["campaign"],
        run=r["run"],
        activity=r["activity"],
        send_time=as_utc(r["send_time"]),
    )


class ProfileStore:
    """The profile store of one database."""

    def __init__(
        self,
        database: Database,
        *,
        unknown_consent_allowed: Iterable[str] = (),
        soft_bounce_limit: int = 5,
        reservation_ttl: timedelta = timedelta(hours=1),
    ) -> None:
        if not 1 <= soft_bounce_limit <= 20:
            raise ValueError("soft_bounce_limit must be between 1 and 20")
        self.database = database
        self.unknown_consent_allowed = set(unknown_consent_allowed)
        self.soft_bounce_limit = soft_bounce_limit
        self.reservation_ttl = reservation_ttl

    # -- writes -------------------------------------------------------------------------------
    def upsert_profiles(self, sandbox: str, profiles: Sequence[Profile]) -> tuple[int, int]:
        """Create or replace profiles in one transaction; return (created, updated)."""
        self._validate_profiles(profiles)
        now = utcnow()
        ids = [p.profile_id for p in profiles]
        with self.database.engine.begin() as conn:
            custom_plans(conn)
            existing: set[str] = set()
            for chunk in _slices(conn, ids):
                existing.update(pid for (pid,) in _profile_rows(conn, sandbox, chunk, ("profile_id",)))
            self._check_identity_owners(conn, sandbox, profiles)
            profiles_t = ProfileRow.__table__  # type: ignore[attr-defined]
            identities_t = IdentityRow.__table__  # type: ignore[attr-defined]
            attributes_t = ProfileAttributeRow.__table__  # type: ignore[attr-defined]
            for chunk in _slices(conn, ids):
                # (Identities by their index on the profile id, sandbox checked outside the probe; attributes
                # by their primary key.)
                delete_per_key(
                    conn,
                    identities_t,
                    chunk,
                    lambda match: [match(identities_t.c.profile_id)],
                    ("profile_id",),
                    sandbox=(identities_t.c.sandbox, sandbox),
                )
                delete_per_key(
                    conn,
                    attributes_t,
                    chunk,
                    lambda match: [attributes_t.c.sandbox == sandbox, match(attributes_t.c.profile_id)],
                    ("profile_id",),
                )
            attribute_rows = [
                {"sandbox": sandbox, "profile_id": p.profile_id, "name": name, "value": encode_scalar(value)}
                for p in profiles
                for name, value in _stored_attributes(p).items()
            ]
            if attribute_rows:
                conn.execute(attributes_t.insert(), attribute_rows)
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
                        "purpose": c.purpose or "marketing",
                    }
                    for c in p.consents
                ]
            if new_rows:
                conn.execute(profiles_t.insert(), new_rows)
            # In id order, as reservers lock profile rows (a reserver holding one of them and waiting for
            # another that this update holds would otherwise deadlock with it).
            for row in sorted(changed_rows, key=lambda row: str(row["profile_id"])):
                conn.execute(
                    profiles_t.update()
                    .where(profiles_t.c.sandbox == sandbox, profiles_t.c.profile_id == row["profile_id"])
                    .values(**{k: v for k, v in row.items() if k not in ("sandbox", "profile_id")})
                )
            if identity_rows:
                conn.execute(identities_t.insert(), identity_rows)
            self._write_consents(conn, consent_rows)
        return len(new_rows), len(changed_rows)

    def set_consent(
        self, sandbox: str, profile_id: str, channel: str, state: str, source: str, purpose: str = "marketing"
    ) -> Profile:
        """Set one profile's consent on one channel for one purpose and return the profile."""
        validate_id(profile_id, "profile")
        purpose = purpose or "marketing"
        if not ATTRIBUTE_NAME.match(purpose):
            raise InvalidArgument("purpose must be a lower-case name", field="purpose", reason="INVALID_PURPOSE")
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
                    "purpose": purpose,
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
            FieldViolation(f"communications[{i}].{name}", f"{name} cannot contain NUL characters")
            for i, c in enumerate(communications)
            for name in ("message_id", "campaign", "run", "activity")
            if "\x00" in getattr(c, name)
        ]
        violations += [
            FieldViolation(f"communications[{i}].channel", "channel must be set")
            for i, c in enumerate(communications)
            if c.channel not in CHANNELS
        ]
        if violations:
            raise InvalidArgument("invalid communications", violations=violations)
        table = CommunicationRow.__table__  # type: ignore[attr-defined]
        now = utcnow()
        with self.database.engine.begin() as conn:
            custom_plans(conn)
            first: dict[str, Communication] = {}
            for c in communications:  # the first of the repeats of a message id counts
                first.setdefault(c.message_id, c)
            rows: list[dict[str, Any]] = [
                {
                    "sandbox": sandbox,
                    "message_id": c.message_id,
                    "profile_id": c.profile_id,
                    "channel": c.channel,
                    "category": c.category,
                    "campaign": c.campaign,
                    "run": c.run,
                    "activity": c.activity,
                    "send_time": c.send_time or now,
                    "expire_time": None,
                    "count_time": c.send_time or now,  # (a reservation recorded keeps its own)
                }
                for c in first.values()
            ]
            # Reservations (live or expired) become communications in place, returning the profile each was
            # reserved for: a message reserved for its profile shows that the profile exists (it was reserved
            # under the profile's lock, and forgetting a profile deletes its reservations), so only the
            # profiles of the other messages are looked up (none, when a batch confirms its reservations).
            converted = self._record_reservations(conn, sandbox, rows)
            reserved = set(converted.items())
            unproven = [c.profile_id for c in communications if (c.message_id, c.profile_id) not in reserved]
            missing_profiles = self._missing_profiles(conn, sandbox, unproven) if unproven else set()
            missing = [i for i, c in enumerate(communications) if c.profile_id in missing_profiles]
            if missing:  # (the reservations recorded above are restored by the rollback)
                raise NotFound(
                    "unknown profile",
                    violations=[FieldViolation(f"communications[{i}].profile", "no such profile") for i in missing],
                )
            rest = [row for row in rows if row["message_id"] not in converted]
            if self.database.is_postgres:
                # One statement: a message id recorded already is skipped, and one reserved meanwhile by
                # another transaction becomes this communication.
                return len(converted) + _insert_replacing_reservations(conn, rest)
            seen: set[str] = set()  # (under SQLite's writer lock, taken by the update above)
            for chunk in _slices(conn, [row["message_id"] for row in rest]):
                seen.update(
                    conn.execute(
                        sa.select(table.c.message_id).where(table.c.sandbox == sandbox, table.c.message_id.in_(chunk))
                    ).scalars()
                )
            unseen = [row for row in rest if row["message_id"] not in seen]
            insert_rows(conn, table, unseen)
        return len(converted) + len(unseen)

    def _record_reservations(self, conn: sa.Connection, sandbox: str, rows: Sequence[dict[str, Any]]) -> dict[str, str]:
        """Turn the reservations (live or expired) of the rows' message ids into these communications (rows
        of the communications table, ``expire_time`` None), in place; returns the message ids updated with
        the profile each was reserved for.

        On PostgreSQL, the reservations held for the profile each communication names (the others are
        recorded as the messages not reserved are, once their profiles are proven), by one update per
        batch (:func:`update_per_key`). The send time, campaign, run and activity are in no index, so that
        the update is heap-only (migration 4)."""
        table = CommunicationRow.__table__  # type: ignore[attr-defined]
        converted: dict[str, str] = {}
        if not rows:
            return converted
        if self.database.is_postgres:
            fields = [name for name in rows[0] if name not in ("sandbox", "message_id", "profile_id", "count_time")]
            for start in range(0, len(rows), POSTGRES_CHUNK):
                batch = rows[start : start + POSTGRES_CHUNK]
                profile_of = {row["message_id"]: row["profile_id"] for row in batch}
                updated = update_per_key(
                    conn,
                    table,
                    {"message_id": list(profile_of), "profile_id": list(profile_of.values())},
                    (table.c.sandbox == sandbox, table.c.expire_time.is_not(None)),
                    {name: [row[name] for row in batch] for name in fields},
                )
                converted.update((mid, profile_of[mid]) for mid in updated)
            return converted
        # SQLite: the reservations are marked recorded first (the update takes the writer lock, held to
        # commit, and returns their profiles), then given the communications' fields, one executemany.
        by_id = {row["message_id"]: row for row in rows}
        for chunk in _slices(conn, list(by_id)):
            converted.update(
                (mid, pid)
                for mid, pid in conn.execute(
                    table.update()
                    .where(table.c.sandbox == sandbox, table.c.message_id.in_(chunk), table.c.expire_time.is_not(None))
                    .values(expire_time=None)
                    .returning(table.c.message_id, table.c.profile_id)
                ).all()
            )
        if converted:
            names = [name for name in rows[0] if name not in ("sandbox", "message_id", "expire_time", "count_time")]
            conn.execute(
                table.update()
                .where(table.c.sandbox == sandbox, table.c.message_id == sa.bindparam("b_message_id"))
                .values({name: sa.bindparam(f"b_{name}") for name in names}),
                [{f"b_{name}": by_id[mid][name] for name in ("message_id", *names)} for mid in converted],
            )
        return converted

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
        """The communication history of one profile, oldest first (its reservations are no history)."""
        table = CommunicationRow.__table__  # type: ignore[attr-defined]
        with self.database.engine.connect() as conn:
            rows = conn.execute(
                sa.select(table)
                .where(table.c.sandbox == sandbox, table.c.profile_id == profile_id, table.c.expire_time.is_(None))
                .order_by(table.c.send_time, table.c.message_id)
            ).mappings()
            return [_communication_from_row(r) for r in rows]

    def check_eligibility(
        self,
        sandbox: str,
        channel: str,
        category: str,
        identities: Sequence[tuple[str, str]],
        *,
        reserve: bool = False,
        message_ids: Sequence[str] = (),
        create_missing: bool = False,
        purpose: str = "marketing",
        full_profiles: bool = True,
        message_keys: MessageKeys | None = None,
        now: datetime | None = None,
    ) -> list[Eligibility]:
        """The verdict for each identity, in order, for a message of ``channel`` and ``category``.

        With ``reserve`` (marketing only), each allowed identity also reserves one send against the caps
        under its ``message_ids`` entry, in the same transaction as the check and under a per-profile
        row lock, so that concurrent reservers never push a profile over a cap. A message id reserved or
        recorded already for the same profile is allowed again without counting twice; one reserved or
        recorded for another profile is refused (INVALID_ARGUMENT on ``message_ids[i]``, nothing written),
        since allowing it would let this profile past its caps uncounted.

        With ``message_keys`` instead of ``message_ids``, the message id of each identity is derived from
        the profile it resolves to (``message_id(sandbox, run, activity, profile_key(profile, identity),
        entity key)``, as the delivery ledger derives its ids), so that one call checks and reserves; the
        verdicts carry the id (``message_id``) of each reservation.

        With ``create_missing``, an identity no profile has gets a new profile holding just that identity
        (no consent), which is then judged like any other.

        Without ``full_profiles``, each verdict's profile holds only what the verdict read (its id, time
        zone, addresses on the channel and consent on it for ``purpose``): the same verdicts, for a caller
        that does not need the profiles (the reserving call after a check).
        """
        if channel not in CHANNELS:
            raise InvalidArgument("channel must be set", field="channel")
        if category not in ("marketing", "transactional"):
            raise InvalidArgument("category must be set", field="category")
        for i, (namespace, value) in enumerate(identities):
            if not namespace or not value:
                raise InvalidArgument(
                    "identities need a namespace and a value", field=f"identities[{i}]", reason="INVALID_IDENTITY"
                )
            if "\x00" in namespace or "\x00" in value:  # PostgreSQL text cannot hold it
                raise InvalidArgument(
                    "identities cannot contain NUL characters", field=f"identities[{i}]", reason="INVALID_IDENTITY"
                )
        reserve = reserve and category == "marketing"
        if reserve and message_keys is not None:
            self._check_message_keys(message_keys, message_ids, len(identities))
        elif reserve:
            if len(message_ids) != len(identities):
                raise InvalidArgument(
                    "reserve needs one message id per identity", field="message_ids", reason="MESSAGE_IDS_MISMATCH"
                )
            for i, message_id in enumerate(message_ids):
                if not message_id or "\x00" in message_id:
                    raise InvalidArgument("message ids must be set, without NUL characters", field=f"message_ids[{i}]")
        now = now or utcnow()
        with self.database.engine.begin() as conn:
            custom_plans(conn)
            owners = self._identity_owners(conn, sandbox, identities)
            if create_missing:
                missing = [ident for ident in dict.fromkeys(identities) if ident not in owners]
                if missing:
                    owners.update(self._create_for_identities(conn, sandbox, missing, now))
            if reserve and message_keys is not None:
                message_ids = [
                    message_id_of(
                        sandbox,
                        message_keys.run,
                        message_keys.activity,
                        profile_key(owners.get(ident), *ident),
                        message_keys.entity_keys[index],
                    )
                    for index, ident in enumerate(identities)
                ]
            profile_ids = sorted(set(owners.values()))
            rules = self._load_rules(conn, sandbox) if category == "marketing" else []
            rules = [r for r in rules if r.applies_to(channel)]
            # Reservers of a profile serialize (without a rule, nothing can be capped: no lock to take). On
            # PostgreSQL the profiles' rows are locked as they are loaded; SQLite takes its writer lock.
            lock = reserve and bool(rules) and bool(profile_ids)
            if lock and not self.database.is_postgres:
                self._lock_counters(conn, sandbox, profile_ids)
            lock = lock and self.database.is_postgres
            if full_profiles:
                profiles = self._load_profiles(conn, sandbox, profile_ids, lock=lock)
            else:
                profiles = self._load_verdict_profiles(
                    conn, sandbox, profile_ids, channel, purpose or "marketing", lock=lock
                )
            # Per profile, once: its addresses on the channel and whether its consent allows marketing.
            addresses_of = {pid: p.addresses(channel) for pid, p in profiles.items()}
            consenting = self._consenting(profiles.values(), channel, purpose or "marketing")
            addresses = [a for found in addresses_of.values() for a in found]
            quarantined = {a for a, q in quarantine.load(conn, sandbox, channel, addresses).items() if q.quarantined}
            sends: dict[str, list[tuple[str, datetime]]] = {}
            if rules:
                sends, expired = self._recent_sends(conn, sandbox, profile_ids, now, _counting_since(rules, now))
                self._drop_expired_reservations(conn, sandbox, expired, now)
            known_ids = self._known_message_ids(conn, sandbox, message_ids, now) if reserve else {}
            capped = _CapCheck(rules, channel, now)
            results = []
            new_reservations = []
            for index, ident in enumerate(identities):
                profile = profiles.get(owners.get(ident, ""))
                if profile is None:
                    results.append(Eligibility(ident, "unknown_profile"))
                    continue
                all_addresses = addresses_of[profile.profile_id]
                if not all_addresses:
                    results.append(Eligibility(ident, "missing_address", profile))
                    continue
                usable = [a for a in all_addresses if a not in quarantined] if quarantined else all_addresses
                if not usable:
                    results.append(Eligibility(ident, "quarantined", profile))
                    continue
                address = usable[0]
                if category == "marketing":
                    if not consenting[profile.profile_id]:
                        results.append(Eligibility(ident, "no_consent", profile))
                        continue
                    message_id = message_ids[index] if reserve else ""
                    if message_id and message_id in known_ids:  # reserved or recorded: it counts once
                        if known_ids[message_id] != profile.profile_id:  # would count another profile's send
                            raise InvalidArgument(
                                "the message id is reserved or recorded for another profile",
                                field=f"message_ids[{index}]",
                                reason="MESSAGE_ID_OF_ANOTHER_PROFILE",
                            )
                    elif rules and capped(sends.get(profile.profile_id, ()), profile.time_zone):
                        results.append(Eligibility(ident, "capped", profile))
                        continue
                    elif message_id:
                        known_ids[message_id] = profile.profile_id
                        sends.setdefault(profile.profile_id, []).append((channel, now))
                        new_reservations.append(
                            {
                                "sandbox": sandbox,
                                "message_id": message_id,
                                "profile_id": profile.profile_id,
                                "channel": channel,
                                "category": "marketing",
                                "campaign": "",
                                "run": message_keys.run if message_keys is not None else "",
                                "activity": message_keys.activity if message_keys is not None else "",
                                "send_time": now,
                                "expire_time": now + self.reservation_ttl,
                                "count_time": now,
                            }
                        )
                    if message_id:
                        results.append(
                            Eligibility(
                                ident,
                                "allowed",
                                profile,
                                address,
                                reserved=True,
                                addresses=usable,
                                message_id=message_id,
                            )
                        )
                        continue
                results.append(Eligibility(ident, "allowed", profile, address, addresses=usable))
            if new_reservations:  # an expired reservation of the same message id is replaced, never a communication
                _insert_replacing_reservations(conn, new_reservations)
        return results

    def release_reservations(self, sandbox: str, message_ids: Sequence[str]) -> int:
        """Release reservations never confirmed (the message was not sent; live or expired); returns how many
        existed. A message recorded already stays in the history."""
        for i, message_id in enumerate(message_ids):
            if not message_id or "\x00" in message_id:
                raise InvalidArgument("message ids must be set, without NUL characters", field=f"message_ids[{i}]")
        table = CommunicationRow.__table__  # type: ignore[attr-defined]
        released = 0
        with self.database.engine.begin() as conn:
            custom_plans(conn)
            for chunk in _slices(conn, list(dict.fromkeys(message_ids))):
                released += len(
                    delete_per_key(
                        conn,
                        table,
                        chunk,
                        lambda match: [
                            table.c.sandbox == sandbox,
                            match(table.c.message_id),
                            table.c.expire_time.is_not(None),
                        ],
                        ("message_id",),
                        unique=True,
                    )
                )
        return released

    # -- lookup, forgetting and history -------------------------------------------------------------
    def lookup_profile(self, sandbox: str, namespace: str, value: str) -> Profile:
        """The profile that owns an identity."""
        if not namespace or not value:
            raise InvalidArgument("identity needs a namespace and a value", field="identity", reason="INVALID_IDENTITY")
        identity_t = IdentityRow.__table__  # type: ignore[attr-defined]
        with self.database.engine.connect() as conn:
            owner = conn.execute(
                sa.select(identity_t.c.profile_id).where(
                    identity_t.c.sandbox == sandbox, identity_t.c.namespace == namespace, identity_t.c.value == value
                )
            ).scalar()
            found = self._load_profiles(conn, sandbox, [owner]) if owner else {}
        if not owner or owner not in found:
            raise NotFound("no profile has the identity", field="identity", reason="PROFILE_NOT_FOUND")
        return found[owner]

    def delete_profile(self, sandbox: str, profile_id: str) -> None:
        """Forget a profile: its identities, consents, history, reservations, counters, and the
        quarantine and delivery events of its addresses."""
        validate_id(profile_id, "name")
        with self.database.engine.begin() as conn:
            self._require_profile(conn, sandbox, profile_id, "name")
            found = self._load_profiles(conn, sandbox, [profile_id])[profile_id]
            by_channel = {
                channel: [v for ns, v in found.identities if ns == namespace]
                for channel, namespace in ADDRESS_NAMESPACE.items()
            }
            by_address = [QuarantineRow.__table__, DeliveryEventRow.__table__]  # type: ignore[attr-defined]
            for table in by_address:
                for channel, addresses in by_channel.items():
                    if addresses:
                        conn.execute(
                            table.delete().where(
                                table.c.sandbox == sandbox, table.c.channel == channel, table.c.address.in_(addresses)
                            )
                        )
            by_profile = [
                row.__table__  # type: ignore[union-attr]
                for row in (
                    IdentityRow,
                    ConsentRow,
                    PurposeConsentRow,
                    CommunicationRow,  # (its reservations too)
                    ProfileCounterRow,
                    ProfileAttributeRow,
                    ProfileRow,
                )
            ]
            for table in by_profile:
                conn.execute(table.delete().where(table.c.sandbox == sandbox, table.c.profile_id == profile_id))

    def list_communications(
        self, sandbox: str, profile_id: str, page_size: int, after: tuple[datetime, str] | None = None
    ) -> tuple[list[Communication], tuple[datetime, str] | None]:
        """One page of a profile's history, newest first, after the ``(send_time, message_id)`` cursor;
        returns the page and the cursor of the next one (None on the last page)."""
        validate_id(profile_id, "profile")
        table = CommunicationRow.__table__  # type: ignore[attr-defined]
        query = sa.select(table).where(
            table.c.sandbox == sandbox, table.c.profile_id == profile_id, table.c.expire_time.is_(None)
        )
        if after is not None:
            query = query.where(
                sa.or_(
                    table.c.send_time < after[0],
                    sa.and_(table.c.send_time == after[0], table.c.message_id < after[1]),
                )
            )
        query = query.order_by(table.c.send_time.desc(), table.c.message_id.desc()).limit(page_size + 1)
        with self.database.engine.connect() as conn:
            self._require_profile(conn, sandbox, profile_id, "profile")
            rows = list(conn.execute(query).mappings())
        page = [_communication_from_row(r) for r in rows[:page_size]]
        cursor = None
        if len(rows) > page_size and page:
            cursor = (page[-1].send_time or utcnow(), page[-1].message_id)
        return page, cursor

    # -- delivery feedback and quarantine ---------------------------------------------------------
    def record_delivery_events(self, sandbox: str, events: Sequence[DeliveryEvent]) -> int:
        """Apply delivery feedback in order; an event id applied before is skipped. Returns how many
        were newly applied. Bounces and deliveries update the address's quarantine; complaints and
        unsubscribes opt the profile out of the channel with the event's source."""
        violations: list[FieldViolation] = []
        for i, e in enumerate(events):
            if not e.event_id:
                violations.append(FieldViolation(f"events[{i}].event_id", "event_id must be set"))
            if e.channel not in CHANNELS:
                violations.append(FieldViolation(f"events[{i}].channel", "channel must be set"))
            if e.kind not in EVENT_KINDS:
                violations.append(FieldViolation(f"events[{i}].type", "type must be set"))
            if not e.address and not e.profile_id:
                violations.append(FieldViolation(f"events[{i}].address", "address or profile must be set"))
        if violations:
            raise InvalidArgument("invalid delivery events", violations=violations, reason="INVALID_EVENT")
        events_t = DeliveryEventRow.__table__  # type: ignore[attr-defined]
        now = utcnow()
        with self.database.engine.begin() as conn:
            custom_plans(conn)
            seen: set[str] = set()
            for chunk in _slices(conn, list(dict.fromkeys(e.event_id for e in events))):
                statement = per_key(
                    conn,
                    chunk,
                    lambda match: sa.select(events_t.c.event_id).where(
                        events_t.c.sandbox == sandbox, match(events_t.c.event_id)
                    ),
                    unique=True,
                )
                seen.update(event_id for (event_id,) in fetch_rows(conn, statement))
            fresh: list[DeliveryEvent] = []
            for e in events:
                if e.event_id not in seen:
                    seen.add(e.event_id)
                    fresh.append(e)
            # What the events need, read for the whole call: the addresses of the events that name only a
            # profile, the owners of the opt-outs that name only an address, whether those profiles exist,
            # and the recorded state of every address that bounced or was delivered to.
            profiles = self._load_profiles(
                conn, sandbox, list({e.profile_id for e in fresh if e.profile_id and not e.address})
            )
            addresses = [
                e.address or (profiles[e.profile_id].address(e.channel) or "" if e.profile_id in profiles else "")
                for e in fresh
            ]
            owners = self._identity_owners(
                conn,
                sandbox,
                [
                    (ADDRESS_NAMESPACE[e.channel], address)
                    for e, address in zip(fresh, addresses, strict=True)
                    if e.kind in OPT_OUT_KINDS and not e.profile_id and address
                ],
            )
            opting_out = [
                e.profile_id or owners.get((ADDRESS_NAMESPACE[e.channel], address), "")
                for e, address in zip(fresh, addresses, strict=True)
            ]
            asked = [pid for e, pid in zip(fresh, opting_out, strict=True) if e.kind in OPT_OUT_KINDS and pid]
            missing = self._missing_profiles(conn, sandbox, asked) if asked else set()
            states: dict[tuple[str, str], Quarantine] = {}
            existing: set[tuple[str, str]] = set()
            for channel in CHANNELS:
                bounced = [
                    a
                    for e, a in zip(fresh, addresses, strict=True)
                    if a and e.channel == channel and e.kind not in OPT_OUT_KINDS
                ]
                if bounced:
                    loaded = quarantine.load(conn, sandbox, channel, bounced, lock=True)
                    existing.update((channel, a) for a in loaded)
                    states.update(((channel, a), loaded.get(a) or Quarantine(channel, a)) for a in bounced)
            log_rows = []
            consents = []
            changed: dict[tuple[str, str], Quarantine] = {}
            for e, address, profile_id in zip(fresh, addresses, opting_out, strict=True):
                log_rows.append(
                    {
                        "sandbox": sandbox,
                        "event_id": e.event_id,
                        "channel": e.channel,
                        "address": address,
                        "kind": e.kind,
                        "event_time": e.event_time or now,
                    }
                )
                if e.kind in OPT_OUT_KINDS:
                    if profile_id and profile_id not in missing:
                        consents.append(
                            {
                                "sandbox": sandbox,
                                "profile_id": profile_id,
                                "channel": e.channel,
                                "state": "opted_out",
                                "source": e.source or e.kind,
                                "update_time": now,
                            }
                        )
                    continue
                if not address:
                    continue  # a forgotten profile, or one without an address on the channel
                key = (e.channel, address)
                changed[key] = quarantine.apply(states[key], e.kind, self.soft_bounce_limit, now)
            if consents:
                self._write_consents(conn, consents)
            if changed:
                quarantine.save(conn, sandbox, list(changed.values()), existing)
            if log_rows:
                conn.execute(events_t.insert(), log_rows)
        return len(log_rows)

    def get_quarantine(self, sandbox: str, channel: str, address: str) -> Quarantine:
        """The bounce state of one address (not quarantined, no bounces, when nothing is recorded)."""
        self._check_address(channel, address)
        with self.database.engine.connect() as conn:
            found = quarantine.load(conn, sandbox, channel, [address])
        return found.get(address) or Quarantine(channel, address)

    def release_quarantine(self, sandbox: str, channel: str, address: str) -> Quarantine:
        """Lift the quarantine of an address and clear its soft bounces; returns the cleared state."""
        self._check_address(channel, address)
        table = QuarantineRow.__table__  # type: ignore[attr-defined]
        with self.database.engine.begin() as conn:
            conn.execute(
                table.delete().where(table.c.sandbox == sandbox, table.c.channel == channel, table.c.address == address)
            )
        return Quarantine(channel, address, update_time=utcnow())

    # -- capping rules ------------------------------------------------------------------------------
    def create_capping_rule(self, sandbox: str, rule: CappingRule) -> CappingRule:
        """Create a capping rule (an id is generated when ``rule_id`` is empty)."""
        rule.rule_id = rule.rule_id or new_id("cap")
        validate_id(rule.rule_id, "capping_rule_id")
        violations = []
        if rule.channel and rule.channel not in CHANNELS:
            violations.append(FieldViolation("capping_rule.channel", "unknown channel"))
        if not 1 <= rule.max_messages <= MAX_MESSAGES_LIMIT:
            violations.append(
                FieldViolation("capping_rule.max_messages", f"must be between 1 and {MAX_MESSAGES_LIMIT}")
            )
        if rule.period not in PERIODS:
            violations.append(FieldViolation("capping_rule.period", "period must be set"))
        if rule.time_basis not in TIME_BASES:
            violations.append(FieldViolation("capping_rule.time_basis", "unknown time basis"))
        if violations:
            raise InvalidArgument("invalid capping rule", violations=violations, reason="INVALID_CAPPING_RULE")
        table = CappingRuleRow.__table__  # type: ignore[attr-defined]
        rule.create_time = utcnow()
        with self.database.engine.begin() as conn:
            exists = conn.execute(
                sa.select(table.c.rule_id).where(table.c.sandbox == sandbox, table.c.rule_id == rule.rule_id)
            ).scalar()
            if exists is not None:
                raise AlreadyExists(
                    f"capping rule {rule.rule_id!r} exists", field="capping_rule_id", reason="CAPPING_RULE_EXISTS"
                )
            conn.execute(
                table.insert().values(
                    sandbox=sandbox,
                    rule_id=rule.rule_id,
                    channel=rule.channel,
                    max_messages=rule.max_messages,
                    period=rule.period,
                    time_basis=rule.time_basis,
                    create_time=rule.create_time,
                )
            )
        return rule

    def list_capping_rules(self, sandbox: str) -> list[CappingRule]:
        """Every capping rule of the sandbox, by id."""
        with self.database.engine.connect() as conn:
            return self._load_rules(conn, sandbox)

    def delete_capping_rule(self, sandbox: str, rule_id: str) -> None:
        """Delete one capping rule."""
        validate_id(rule_id, "name")
        table = CappingRuleRow.__table__  # type: ignore[attr-defined]
        with self.database.engine.begin() as conn:
            deleted = conn.execute(
                table.delete().where(table.c.sandbox == sandbox, table.c.rule_id == rule_id)
            ).rowcount
        if not deleted:
            raise NotFound(f"capping rule {rule_id!r} does not exist", field="name", reason="CAPPING_RULE_NOT_FOUND")

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
            for name in p.attributes:
                if not ATTRIBUTE_NAME.match(name):
                    violations.append(
                        FieldViolation(f"profiles[{i}].attributes", f"{name!r} is not a lower-case attribute name")
                    )
            for j, consent in enumerate(p.consents):
                if consent.channel not in CHANNELS:
                    violations.append(FieldViolation(f"profiles[{i}].consents[{j}].channel", "channel must be set"))
                if consent.state not in CONSENT_STATES:
                    violations.append(FieldViolation(f"profiles[{i}].consents[{j}].state", "state must be set"))
                if consent.purpose and not ATTRIBUTE_NAME.match(consent.purpose):
                    violations.append(
                        FieldViolation(f"profiles[{i}].consents[{j}].purpose", "purpose must be a lower-case name")
                    )
        if violations:
            raise InvalidArgument("invalid profiles", violations=violations, reason="INVALID_PROFILE")

    def _check_identity_owners(self, conn: sa.Connection, sandbox: str, profiles: Sequence[Profile]) -> None:
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
        owners = self._identity_owners(conn, sandbox, list(claimed))
        for ident, (i, j, pid) in claimed.items():
            owner = owners.get(ident)
            if owner is not None and owner != pid:
                violations.append(
                    FieldViolation(f"profiles[{i}].identities[{j}]", f"belongs to profile {owner!r} already")
                )
        if violations:
            raise InvalidArgument("identity conflict", violations=violations, reason="IDENTITY_CONFLICT")

    @staticmethod
    def _identity_owners(
        conn: sa.Connection, sandbox: str, identities: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], str]:
        """The profile owning each of ``identities`` that has an owner (one query per namespace)."""
        identity_t = IdentityRow.__table__  # type: ignore[attr-defined]
        by_namespace: dict[str, dict[str, None]] = {}
        for namespace, value in identities:
            by_namespace.setdefault(namespace, {})[value] = None
        owners: dict[tuple[str, str], str] = {}

        def owner_of(namespace: str) -> Callable[[KeyMatch], sa.Select[Any]]:
            return lambda match: sa.select(identity_t.c.value, identity_t.c.profile_id).where(
                identity_t.c.sandbox == sandbox, identity_t.c.namespace == namespace, match(identity_t.c.value)
            )

        for namespace, values in by_namespace.items():
            for chunk in _slices(conn, list(values)):
                for value, pid in fetch_rows(conn, per_key(conn, chunk, owner_of(namespace), unique=True)):
                    owners[(namespace, value)] = pid
        return owners

    @staticmethod
    def _check_message_keys(keys: MessageKeys, message_ids: Sequence[str], count: int) -> None:
        """INVALID_ARGUMENT unless ``keys`` can derive one message id per identity (and no ids are given)."""
        if message_ids:
            raise InvalidArgument(
                "give message ids or the keys to derive them, not both",
                field="message_ids",
                reason="MESSAGE_IDS_MISMATCH",
            )
        violations = [
            FieldViolation(name, f"{name} must be set, without NUL characters")
            for name, value in (("run", keys.run), ("activity", keys.activity))
            if not value or "\x00" in value
        ]
        if len(keys.entity_keys) != count:
            violations.append(FieldViolation("entity_keys", "reserve needs one entity key per identity"))
        violations += [
            FieldViolation(f"entity_keys[{i}]", "entity keys cannot contain NUL characters")
            for i, key in enumerate(keys.entity_keys)
            if "\x00" in key
        ]
        if violations:
            raise InvalidArgument("invalid message keys", violations=violations, reason="INVALID_MESSAGE_KEYS")

    def _consenting(self, profiles: Iterable[Profile], channel: str, purpose: str) -> dict[str, bool]:
        """Per profile, whether its consent on ``channel`` for ``purpose`` allows a marketing message
        (opted in, or unknown on a channel where unknown consent is allowed)."""
        unknown_allowed = channel in self.unknown_consent_allowed
        allowed: dict[str, bool] = {}
        for profile in profiles:
            state = "unknown"
            for consent in profile.consents:  # the first recorded for the channel and purpose, as Profile.consent
                if consent.channel == channel and consent.purpose == purpose:
                    state = consent.state
                    break
            allowed[profile.profile_id] = state == "opted_in" or (state == "unknown" and unknown_allowed)
        return allowed

    @staticmethod
    def _missing_profiles(conn: sa.Connection, sandbox: str, profile_ids: Sequence[str]) -> set[str]:
        """The ids among ``profile_ids`` that no profile has (read in the server: none are fetched when
        every profile exists)."""
        profiles_t = ProfileRow.__table__  # type: ignore[attr-defined]
        wanted = list(dict.fromkeys(profile_ids))
        missing: set[str] = set()
        if conn.dialect.name == "postgresql":
            # One primary-key probe per id, whatever the statistics say: a LATERAL subquery with LIMIT 1
            # cannot be flattened into a join. As an anti-join, PostgreSQL walked the profiles' whole
            # index per batch (1M profiles), or, with statistics lagging behind a fresh load, compared
            # every id with every profile.
            for chunk in _slices(conn, wanted):
                asked = sa.func.unnest(array_of(list(chunk), sa.Text())).table_valued("id").render_derived(name="asked")
                found = (
                    sa.select(sa.literal(1).label("found"))
                    .where(profiles_t.c.sandbox == sandbox, profiles_t.c.profile_id == asked.c.id)
                    .limit(1)
                    .lateral("f")
                )
                missing.update(
                    conn.execute(
                        sa.select(asked.c.id)
                        .select_from(asked)
                        .outerjoin(found, sa.true())
                        .where(found.c.found.is_(None))
                    ).scalars()
                )
            return missing
        known: set[str] = set()
        for chunk in _slices(conn, wanted):
            known.update(
                conn.execute(
                    sa.select(profiles_t.c.profile_id).where(
                        profiles_t.c.sandbox == sandbox, profiles_t.c.profile_id.in_(chunk)
                    )
                ).scalars()
            )
        return set(wanted) - known

    def _require_profile(self, conn: sa.Connection, sandbox: str, profile_id: str, field_name: str) -> None:
        exists = conn.execute(
            sa.select(ProfileRow.profile_id).where(  # type: ignore[call-overload]
                ProfileRow.sandbox == sandbox, ProfileRow.profile_id == profile_id
            )
        ).scalar()
        if exists is None:
            raise NotFound(f"profile {profile_id!r} does not exist", field=field_name, reason="PROFILE_NOT_FOUND")

    @staticmethod
    def _check_address(channel: str, address: str) -> None:
        if channel not in CHANNELS:
            raise InvalidArgument("channel must be set", field="channel")
        if not address:
            raise InvalidArgument("address must be set", field="address")

    def _lock_counters(self, conn: sa.Connection, sandbox: str, profile_ids: Sequence[str]) -> None:
        """Serialize the reservers of ``profile_ids`` on SQLite: the first write (the counter rows'
        version bump) takes the database's single writer lock, held to commit. (PostgreSQL locks the
        profiles' own rows as it loads them: :func:`_profile_rows`.)"""
        table = ProfileCounterRow.__table__  # type: ignore[attr-defined]
        rows = [{"sandbox": sandbox, "profile_id": pid, "version": 0} for pid in profile_ids]
        insert_rows(conn, table, rows, skip_conflicts=True)
        for chunk in _slices(conn, list(profile_ids)):
            conn.execute(
                table.update()
                .where(table.c.sandbox == sandbox, table.c.profile_id.in_(chunk))
                .values(version=table.c.version + 1)
            )

    def _drop_expired_reservations(
        self, conn: sa.Connection, sandbox: str, message_ids: Sequence[str], now: datetime
    ) -> None:
        """Delete the expired reservations of ``message_ids`` (they count no more; one reserved again
        meanwhile, with a new expiry, stays). Expired reservations are found by the reads of the
        capping check (no statement when there are none, as a delete by profile for every batch
        cost); without capping rules they are ignored by every read and replaced when their message
        id is reserved again, released, or their profile forgotten."""
        reservations = CommunicationRow.__table__  # type: ignore[attr-defined]
        for chunk in _slices(conn, list(dict.fromkeys(message_ids))):
            delete_per_key(
                conn,
                reservations,
                chunk,
                lambda match: [
                    reservations.c.sandbox == sandbox,
                    match(reservations.c.message_id),
                    reservations.c.expire_time <= now,
                ],
                ("message_id",),
                unique=True,
            )

    def _create_for_identities(
        self, conn: sa.Connection, sandbox: str, identities: Sequence[tuple[str, str]], now: datetime
    ) -> dict[tuple[str, str], str]:
        """Create one bare profile per identity; an identity claimed meanwhile by a concurrent caller
        keeps that caller's profile (ours is dropped). Returns the owner of each identity."""
        profiles_t = ProfileRow.__table__  # type: ignore[attr-defined]
        identity_t = IdentityRow.__table__  # type: ignore[attr-defined]
        dialect_insert = postgresql.insert if self.database.is_postgres else sqlite.insert
        wanted = {ident: new_id("p") for ident in identities}
        conn.execute(
            profiles_t.insert(),
            [
                {"sandbox": sandbox, "profile_id": pid, "create_time": now, "update_time": now}
                for pid in wanted.values()
            ],
        )
        conn.execute(
            dialect_insert(identity_t).on_conflict_do_nothing(),
            [
                {"sandbox": sandbox, "namespace": ns, "value": value, "profile_id": pid}
                for (ns, value), pid in wanted.items()
            ],
        )
        owners: dict[tuple[str, str], str] = {}
        for (ns, value), pid in wanted.items():
            owner = conn.execute(
                sa.select(identity_t.c.profile_id).where(
                    identity_t.c.sandbox == sandbox, identity_t.c.namespace == ns, identity_t.c.value == value
                )
            ).scalar()
            owners[(ns, value)] = owner or pid
            if owner and owner != pid:
                conn.execute(profiles_t.delete().where(profiles_t.c.sandbox == sandbox, profiles_t.c.profile_id == pid))
        return owners

    @staticmethod
    def _load_rules(conn: sa.Connection, sandbox: str) -> list[CappingRule]:
        table = CappingRuleRow.__table__  # type: ignore[attr-defined]
        return [
            CappingRule(
                rule_id=r["rule_id"],
                max_messages=int(r["max_messages"]),
                period=r["period"],
                channel=r["channel"],
                time_basis=r["time_basis"],
                create_time=as_utc(r["create_time"]),
            )
            for r in conn.execute(
                sa.select(table).where(table.c.sandbox == sandbox).order_by(table.c.rule_id)
            ).mappings()
        ]

    @staticmethod
    def _recent_sends(
        conn: sa.Connection, sandbox: str, profile_ids: Sequence[str], now: datetime, since: datetime
    ) -> tuple[dict[str, list[tuple[str, datetime]]], list[str]]:
        """Per profile, the (channel, time) of marketing sends since ``since`` and of live reservations;
        and the message ids of the profiles' expired reservations, which count no more (for the caller
        to drop: read here, they cost no statement of their own when there are none).

        Sends and reservations are rows of one table, read by one statement: a reservation that a
        concurrent RecordCommunications turns into a communication is seen once, as one or the other."""
        comms = CommunicationRow.__table__  # type: ignore[attr-defined]
        sends: dict[str, list[tuple[str, datetime]]] = {}
        expired: list[str] = []
        for chunk in _slices(conn, list(profile_ids)):
            # Per profile, the range of its rows counted since ``since`` by the index on the profile id and
            # count time: what a batch reads grows neither with the sandbox's history nor with the profile's
            # (a reservation counts at its reservation time, live or expired, so it is in that range too).
            rows = per_key(
                conn,
                chunk,
                lambda match: sa.select(
                    comms.c.profile_id, comms.c.channel, comms.c.count_time, comms.c.expire_time, comms.c.message_id
                ).where(
                    match(comms.c.profile_id),
                    comms.c.count_time >= since,
                    comms.c.category == "marketing",
                ),
                sandbox=(comms.c.sandbox, sandbox),
            )
            for pid, channel, when, expire_time, message_id in fetch_rows(conn, rows):
                if expire_time is not None and as_utc(expire_time) <= now:  # type: ignore[operator]
                    expired.append(message_id)
                else:
                    sends.setdefault(pid, []).append((channel, as_utc(when) or now))
        return sends, expired

    @staticmethod
    def _known_message_ids(
        conn: sa.Connection, sandbox: str, message_ids: Sequence[str], now: datetime
    ) -> dict[str, str]:
        """The message ids already recorded or reserved (and not expired), with their profile ids: one
        primary-key probe per id."""
        comms = CommunicationRow.__table__  # type: ignore[attr-defined]
        known: dict[str, str] = {}
        for chunk in _slices(conn, list(dict.fromkeys(message_ids))):
            rows = per_key(
                conn,
                chunk,
                lambda match: sa.select(comms.c.message_id, comms.c.profile_id).where(
                    comms.c.sandbox == sandbox,
                    match(comms.c.message_id),
                    sa.or_(comms.c.expire_time.is_(None), comms.c.expire_time > now),
                ),
                unique=True,
            )
            known.update((mid, pid) for mid, pid in fetch_rows(conn, rows))
        return known

    def _write_consents(self, conn: sa.Connection, rows: Sequence[dict[str, object]]) -> None:
        """Write many consents as ``_write_consent`` would one after the other (the last of a repeated
        key wins), in one upsert per table."""
        dialect_insert = postgresql.insert if self.database.is_postgres else sqlite.insert
        by_table: dict[bool, dict[tuple[object, ...], dict[str, object]]] = {True: {}, False: {}}
        for row in rows:
            marketing = row.get("purpose", "marketing") == "marketing"
            row = {k: v for k, v in row.items() if k != "purpose" or not marketing}
            key = (row["sandbox"], row["profile_id"], row["channel"], row.get("purpose"))
            by_table[marketing].pop(key, None)  # keep the order of the last write
            by_table[marketing][key] = row
        for marketing, keyed in by_table.items():
            if not keyed:
                continue
            row_class: Any = ConsentRow if marketing else PurposeConsentRow
            table = row_class.__table__
            statement = dialect_insert(table)
            statement = statement.on_conflict_do_update(
                index_elements=[c.name for c in table.primary_key.columns],
                set_={name: statement.excluded[name] for name in ("state", "source", "update_time")},
            )
            values = list(keyed.values())
            for start in range(0, len(values), SQLITE_CHUNK):
                conn.execute(statement, values[start : start + SQLITE_CHUNK])

    @staticmethod
    def _write_consent(conn: sa.Connection, row: dict[str, object]) -> None:
        row = dict(row)
        purpose = row.pop("purpose", "marketing")
        if purpose == "marketing":
            table = ConsentRow.__table__  # type: ignore[attr-defined]
            key = table.c.sandbox == row["sandbox"]
        else:
            table = PurposeConsentRow.__table__  # type: ignore[attr-defined]
            row["purpose"] = purpose
            key = sa.and_(table.c.sandbox == row["sandbox"], table.c.purpose == purpose)
        updated = conn.execute(
            table.update()
            .where(key, table.c.profile_id == row["profile_id"], table.c.channel == row["channel"])
            .values(state=row["state"], source=row["source"], update_time=row["update_time"])
        )
        if updated.rowcount == 0:
            conn.execute(table.insert().values(**row))

    @staticmethod
    def _load_profiles(
        conn: sa.Connection, sandbox: str, ids: Sequence[str], *, lock: bool = False
    ) -> dict[str, Profile]:
        """The profiles of ``ids`` that exist, in full (rows fetched at once, as tuples); with ``lock``
        (PostgreSQL), their rows are locked as they are read (:func:`_profile_rows`)."""
        identity_t = IdentityRow.__table__  # type: ignore[attr-defined]
        consents_t = ConsentRow.__table__  # type: ignore[attr-defined]
        purposes_t = PurposeConsentRow.__table__  # type: ignore[attr-defined]
        attributes_t = ProfileAttributeRow.__table__  # type: ignore[attr-defined]
        found: dict[str, Profile] = {}
        for chunk in _slices(conn, list(ids)):
            columns = ("profile_id", "first_name", "last_name", "locale", "time_zone", "create_time", "update_time")
            for pid, first, last, locale, time_zone, created, updated in _profile_rows(
                conn, sandbox, chunk, columns, lock=lock
            ):
                found[pid] = Profile(
                    profile_id=pid,
                    first_name=first,
                    last_name=last,
                    locale=locale,
                    time_zone=time_zone,
                    create_time=as_utc(created),
                    update_time=as_utc(updated),
                )
            # Each of the profiles' identities, consents and attributes: one index range per profile.
            identities = per_key(
                conn,
                chunk,
                lambda match: sa.select(identity_t.c.namespace, identity_t.c.value, identity_t.c.profile_id).where(
                    match(identity_t.c.profile_id)
                ),
                sandbox=(identity_t.c.sandbox, sandbox),
            )
            for ns, value, pid in fetch_rows(
                conn, identities.order_by(identities.selected_columns.namespace, identities.selected_columns.value)
            ):
                found[pid].identities.append((ns, value))
            # Marketing consents, then those of other purposes, each by channel (and purpose): one statement.
            marketing = per_key(
                conn,
                chunk,
                lambda match: sa.select(
                    sa.literal(0).label("kind"),
                    consents_t.c.profile_id,
                    consents_t.c.channel,
                    consents_t.c.state,
                    consents_t.c.source,
                    consents_t.c.update_time,
                    sa.literal("marketing").label("purpose"),
                ).where(consents_t.c.sandbox == sandbox, match(consents_t.c.profile_id)),
            )
            others = per_key(
                conn,
                chunk,
                lambda match: sa.select(
                    sa.literal(1).label("kind"),
                    purposes_t.c.profile_id,
                    purposes_t.c.channel,
                    purposes_t.c.state,
                    purposes_t.c.source,
                    purposes_t.c.update_time,
                    purposes_t.c.purpose,
                ).where(purposes_t.c.sandbox == sandbox, match(purposes_t.c.profile_id)),
            )
            ordered = sa.union_all(marketing, others).order_by(
                sa.literal_column("kind"), sa.literal_column("channel"), sa.literal_column("purpose")
            )
            for _, pid, channel, state, source, updated, purpose in fetch_rows(conn, ordered):
                found[pid].consents.append(Consent(channel, state, source, as_utc(updated), purpose))
            attributes = per_key(
                conn,
                chunk,
                lambda match: sa.select(attributes_t.c.profile_id, attributes_t.c.name, attributes_t.c.value).where(
                    attributes_t.c.sandbox == sandbox, match(attributes_t.c.profile_id)
                ),
            )
            for pid, name, value in fetch_rows(conn, attributes.order_by(attributes.selected_columns.name)):
                if name == _COUNTRY:
                    found[pid].country = str(decode_scalar(value))
                else:
                    found[pid].attributes[name] = decode_scalar(value)
        return found

    @staticmethod
    def _load_verdict_profiles(
        conn: sa.Connection, sandbox: str, ids: Sequence[str], channel: str, purpose: str, *, lock: bool = False
    ) -> dict[str, Profile]:
        """The profiles of ``ids`` that exist, holding only what a verdict reads: the time zone, the
        identities of the channel's address namespace and the consent on the channel for ``purpose``."""
        identity_t = IdentityRow.__table__  # type: ignore[attr-defined]
        if purpose == "marketing":
            consents_t = ConsentRow.__table__  # type: ignore[attr-defined]
            of_purpose = sa.true()
        else:
            consents_t = PurposeConsentRow.__table__  # type: ignore[attr-defined]
            of_purpose = consents_t.c.purpose == purpose
        namespace = ADDRESS_NAMESPACE[channel]
        found: dict[str, Profile] = {}
        # Three single-table statements: a join of the three may be planned as nested loops over whole
        # tables before their first statistics (45 s for 5,000 of 50,000 profiles, measured).
        for chunk in _slices(conn, list(ids)):
            for pid, time_zone in _profile_rows(conn, sandbox, chunk, ("profile_id", "time_zone"), lock=lock):
                found[pid] = Profile(profile_id=pid, time_zone=time_zone)
            addresses = per_key(
                conn,
                chunk,
                lambda match: sa.select(identity_t.c.value, identity_t.c.profile_id).where(
                    match(identity_t.c.profile_id), identity_t.c.namespace == namespace
                ),
                sandbox=(identity_t.c.sandbox, sandbox),
            )
            for value, pid in fetch_rows(conn, addresses.order_by(addresses.selected_columns.value)):
                found[pid].identities.append((namespace, value))
            consents = per_key(
                conn,
                chunk,
                lambda match: sa.select(consents_t.c.profile_id, consents_t.c.state).where(
                    consents_t.c.sandbox == sandbox,
                    match(consents_t.c.profile_id),
                    consents_t.c.channel == channel,
                    of_purpose,
                ),
                unique=True,  # one consent per channel (and purpose)
            )
            for pid, state in fetch_rows(conn, consents):
                found[pid].consents.append(Consent(channel, state, purpose=purpose))
        return found


def _insert_replacing_reservations(conn: sa.Connection, rows: Sequence[dict[str, Any]]) -> int:
    """Insert rows of communications in one statement; a row whose message id is taken replaces it when
    it is a reservation (live or expired), and is skipped when it is a communication. Returns how many
    were written."""
    comms = CommunicationRow.__table__  # type: ignore[attr-defined]
    return insert_rows(
        conn,
        comms,
        rows,
        replace_conflicts=True,
        replace_where=comms.c.expire_time.is_not(None),
        conflicts_unlikely=True,
    )


def _counting_since(rules: Sequence[CappingRule], now: datetime) -> datetime:
    """The earliest send any of ``rules`` can count: the start of the longest current period in UTC, a
    day earlier for profiles whose local period began before UTC's (time zones reach UTC+14). Only the
    sends since then are read, rather than a month of history when the rules are daily."""
    return min(period_start(CappingRule("", 1, rule.period), now, "") for rule in rules) - timedelta(days=1)


class _CapCheck:
    """Whether one more message on a channel would exceed any of the rules, for one call: each rule's
    period start is computed once per time zone, and a history shorter than every rule's limit is not
    counted at all."""

    def __init__(self, rules: Sequence[CappingRule], channel: str, now: datetime) -> None:
        self.rules = rules
        self.channel = channel
        self.now = now
        self.least = min((rule.max_messages for rule in rules), default=0)
        self.starts: dict[tuple[int, str], datetime] = {}

    def __call__(self, sends: Sequence[tuple[str, datetime]], time_zone: str) -> bool:
        """True when one more message would exceed a rule, given the counted ``sends`` (channel, time)."""
        if len(sends) < self.least:  # nothing can be at its limit
            return False
        for index, rule in enumerate(self.rules):
            zone_name = time_zone if rule.time_basis == "profile" else ""
            start = self.starts.get((index, zone_name))
            if start is None:
                start = self.starts[(index, zone_name)] = period_start(rule, self.now, zone_name)
            counted = sum(1 for c, when in sends if when >= start and (not rule.channel or c == rule.channel))
            if counted + 1 > rule.max_messages:
                return True
        return False


def _stored_attributes(profile: Profile) -> dict[str, Scalar]:
    """The rows of ``profile_attributes`` for a profile: its custom attributes and its country."""
    stored: dict[str, Scalar] = dict(profile.attributes)
    if profile.country:
        stored[_COUNTRY] = profile.country
    return stored
