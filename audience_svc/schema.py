"""Entity schemas: their validation, their JSON form in the catalog and their SQLAlchemy tables.

An entity is a user-defined record type stored in a real table. Its schema names typed attributes
(the table's columns, in order), a primary key, a version attribute (integer or timestamp: the
highest version of a record wins), for a targeting dimension an identity binding (which
attribute identifies a person, in which namespace), and named links to other entities. Schemas are
validated before anything is written, and every violation names the field of the request that holds
it (``entity.attributes[2].type``).

A link joins this entity's attributes to a target entity's attributes, pair by pair:

* ``many_to_one`` (N-1): each record has at most one linked record, because the target attributes
  are exactly the target's primary key (``booking.hotel`` → ``hotel``). Its attributes are reachable
  in rules by dot path (``hotel.city``).
* ``one_to_many`` (1-N): each record has any number of linked records (``customer.bookings``); rules
  test them with link conditions (exists, count, aggregates).

Only the local half of a link is checked here; the target half (the target exists, its attributes
exist with compatible types) is checked by the catalog, which knows the other entities.

Every sandbox has the built-in entity ``message_logs`` (:data:`MESSAGE_LOGS_SCHEMA`: one row per
event of a message, keyed by message id and status), and every entity with an identity binding on a
string, enum or integer attribute (:data:`MESSAGE_LOG_IDENTITY_TYPES`; other types have no text form
that is the same in SQL on both backends) has the built-in one-to-many link ``message_logs`` to it
(:func:`message_logs_link`). That link is
implicit: it is not stored with the entity's links and not listed in them, but
:meth:`EntitySchema.link` finds it, so rules, enrichment and change of dimension follow it like any
user-defined link. Besides its join pair (the identity attribute = ``identity_value``) it fixes
``identity_namespace`` to the entity's namespace (:attr:`Link.target_values`). The name
``message_logs`` is reserved: no user-defined entity, link or attribute may take it (an existing attribute or
link that took it before the built-in link existed stays, and then hides the built-in link of its entity).

Attribute types map to portable column types: ``string`` and ``enum`` to TEXT, ``integer`` to
BIGINT, ``decimal`` to NUMERIC(38, 10) (stored as a floating-point number by SQLite, so about 15
significant digits survive there), ``boolean``, ``date`` and ``timestamp`` (UTC) to their own types.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

import sqlalchemy as sa

from audience_svc.violations import invalid_argument
from carillon_chassis.errors import FailedPrecondition, FieldViolation

ATTRIBUTE_TYPES = ("string", "integer", "decimal", "boolean", "date", "timestamp", "enum")
STRING_TYPES = ("string", "enum")
VERSION_TYPES = ("integer", "timestamp")
MANY_TO_ONE = "many_to_one"
ONE_TO_MANY = "one_to_many"
LINK_CARDINALITIES = (MANY_TO_ONE, ONE_TO_MANY)
MAX_LINKS = 100
ENTITY_ID_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,40}$")
ATTRIBUTE_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
MAX_ATTRIBUTES = 1000
MAX_ENUM_VALUES = 1000
MAX_DISPLAY_NAME = 200
MAX_NAMESPACE = 63
# The built-in entity of message logs, and the name of the built-in link every dimension has to it.
MESSAGE_LOGS = "message_logs"
MESSAGE_STATUSES = ("sent", "delivered", "opened", "clicked", "bounced", "failed")
MESSAGE_CHANNELS = ("email", "sms", "push", "direct_mail")
# The identity attribute types the built-in link supports: those whose text in SQL (a cast to text,
# the same on both backends) equals their canonical text, the identity value messages are logged with.
MESSAGE_LOG_IDENTITY_TYPES = ("string", "enum", "integer")


@dataclass(frozen=True)
class Attribute:
    """One typed column of an entity; ``enum_values`` only for the ``enum`` type."""

    name: str
    type: str
    nullable: bool = False
    enum_values: tuple[str, ...] = ()


@dataclass(frozen=True)
class IdentityBinding:
    """Which attribute of a targeting dimension identifies a person, and in which namespace."""

    attribute: str
    namespace: str


@dataclass(frozen=True)
class JoinPair:
    """One pair of joined attributes of a link: this entity's ``attribute`` = the target's."""

    attribute: str
    target_attribute: str


@dataclass(frozen=True)
class Link:
    """A named link to another entity (or to the same one), N-1 or 1-N, on pairs of attributes.

    ``target_values`` (built-in links only) are further conditions on the target: each names a
    target attribute and the string it must equal (bound as a parameter).
    """

    name: str
    target: str
    cardinality: str
    join: tuple[JoinPair, ...]
    target_values: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class EntitySchema:
    """The user-defined part of an entity: attributes, primary key, version, identity and links."""

    attributes: tuple[Attribute, ...]
    primary_key: tuple[str, ...]
    version_attribute: str
    identity: IdentityBinding | None = None
    display_name: str = ""
    links: tuple[Link, ...] = ()

    def attribute(self, name: str) -> Attribute | None:
        """The attribute called ``name``, or None."""
        return self._by_name.get(name)

    def link(self, name: str) -> Link | None:
        """The link called ``name`` (a declared one, or the built-in ``message_logs`` link), or None."""
        found = next((link for link in self.links if link.name == name), None)
        if found is None and name == MESSAGE_LOGS and self.identity is not None and self.attribute(name) is None:
            identity = self.attribute(self.identity.attribute)
            if identity is not None and identity.type in MESSAGE_LOG_IDENTITY_TYPES:
                return message_logs_link(self.identity)
        return found

    @property
    def key_attributes(self) -> tuple[Attribute, ...]:
        """The primary-key attributes, in key order."""
        return tuple(self._by_name[name] for name in self.primary_key)

    @cached_property
    def _by_name(self) -> dict[str, Attribute]:
        return {a.name: a for a in self.attributes}


@dataclass(frozen=True)
class Entity:
    """A stored entity: its schema, the name of its table, and its catalog timestamps."""

    sandbox: str
    entity_id: str
    schema: EntitySchema
    table_name: str
    create_time: datetime | None = None
    update_time: datetime | None = None

    @property
    def name(self) -> str:
        """The resource name, ``entities/{entity}``."""
        return f"entities/{self.entity_id}"

    @cached_property
    def table(self) -> sa.Table:
        """The entity's table as a SQLAlchemy Core table (built once)."""
        return entity_table(self.table_name, self.schema)

    def key_columns(self) -> list[sa.Column[Any]]:
        """The primary-key columns, in key order."""
        return [self.table.c[name] for name in self.schema.primary_key]


def validate_entity_id(entity_id: str, field_path: str = "entity_id") -> list[FieldViolation]:
    """The violations of an entity id (empty when it is valid)."""
    if ENTITY_ID_PATTERN.match(entity_id):
        return []
    return [FieldViolation(field_path, "entity ids are 1-41 characters of a-z, 0-9 and _, starting with a letter")]


def message_logs_link(identity: IdentityBinding) -> Link:
    """The built-in one-to-many link ``message_logs`` of a dimension with this identity binding."""
    return Link(
        name=MESSAGE_LOGS,
        target=MESSAGE_LOGS,
        cardinality=ONE_TO_MANY,
        join=(JoinPair(identity.attribute, "identity_value"),),
        target_values=(("identity_namespace", identity.namespace),),
    )


MESSAGE_LOGS_SCHEMA = EntitySchema(
    attributes=(
        Attribute("message_id", "string"),
        Attribute("status", "enum", enum_values=MESSAGE_STATUSES),
        Attribute("campaign", "string"),
        Attribute("run", "string"),
        Attribute("activity", "string"),
        Attribute("channel", "enum", enum_values=MESSAGE_CHANNELS),
        Attribute("identity_namespace", "string"),
        Attribute("identity_value", "string"),
        Attribute("profile_id", "string", nullable=True),
        Attribute("entity_key", "string", nullable=True),
        Attribute("event_time", "timestamp"),
        Attribute("version", "integer"),
    ),
    primary_key=("message_id", "status"),
    version_attribute="version",
    display_name="Message logs",
)
"""The schema of the built-in entity ``message_logs``; ``version`` is the event time in microseconds."""
# The index of the built-in link's join (namespace first: it is always fixed).
MESSAGE_LOGS_INDEX = ("identity_namespace", "identity_value")


def is_built_in_message_logs(entity: Entity) -> bool:
    """Whether ``entity`` is the built-in ``message_logs``, not a user entity that took the id before it existed."""
    return entity.entity_id == MESSAGE_LOGS and definition_to_json(entity.schema) == definition_to_json(
        MESSAGE_LOGS_SCHEMA
    )


def message_logs_shadowed() -> FailedPrecondition:
    """The error of a sandbox whose ``message_logs`` is a user entity: no built-in message logs there."""
    return FailedPrecondition(
        f"the sandbox's entity {MESSAGE_LOGS!r} is a user entity created before the built-in entity of message "
        "logs existed: message logs cannot be recorded there, nor reached through the built-in link, until that "
        "entity is moved away (an operator migration)",
        reason="MESSAGE_LOGS_SHADOWED",
        metadata={"entity": f"entities/{MESSAGE_LOGS}"},
    )


def checked_link_target(link: Link, target: Entity | None) -> Entity | None:
    """``target`` as resolved for ``link``; FAILED_PRECONDITION (MESSAGE_LOGS_SHADOWED) when ``link`` is the
    built-in link and its target is a user entity called ``message_logs``."""
    if target is not None and link.target_values and not is_built_in_message_logs(target):
        raise message_logs_shadowed()
    return target


def validate_schema(entity_id: str, schema: EntitySchema, existing: EntitySchema | None = None) -> None:
    """Raise InvalidArgument listing every violation of the id and schema; return when both are valid.

    ``existing`` is the schema being changed (None for a new entity): its attributes and links keep
    the name ``message_logs`` when they had it (created before it was reserved); only new ones are
    refused it.
    """
    violations = validate_entity_id(entity_id)
    violations += _schema_violations(schema, existing)
    if violations:
        raise invalid_argument(f"the entity schema has {len(violations)} problem(s)", violations, "INVALID_ENTITY")


def _schema_violations(schema: EntitySchema, existing: EntitySchema | None = None) -> list[FieldViolation]:
    found: list[FieldViolation] = []
    old_attributes = existing.attributes if existing is not None else ()

    def bad(path: str, description: str) -> None:
        found.append(FieldViolation(path, description))

    if len(schema.display_name) > MAX_DISPLAY_NAME:
        bad("entity.display_name", f"display names have at most {MAX_DISPLAY_NAME} characters")
    if not schema.attributes:
        bad("entity.attributes", "an entity needs at least one attribute")
    if len(schema.attributes) > MAX_ATTRIBUTES:
        bad("entity.attributes", f"an entity has at most {MAX_ATTRIBUTES} attributes")
    seen: set[str] = set()
    for i, attribute in enumerate(schema.attributes):
        path = f"entity.attributes[{i}]"
        if not ATTRIBUTE_NAME_PATTERN.match(attribute.name):
            bad(f"{path}.name", "attribute names are 1-63 characters of a-z, 0-9 and _, starting with a letter")
        elif attribute.name in seen:
            bad(f"{path}.name", f"duplicate attribute name {attribute.name!r}")
        elif attribute.name == MESSAGE_LOGS and attribute not in old_attributes:
            bad(f"{path}.name", f"{MESSAGE_LOGS!r} is reserved for the built-in link to message logs")
        seen.add(attribute.name)
        if attribute.type not in ATTRIBUTE_TYPES:
            bad(f"{path}.type", "the type must be set")
        elif attribute.type == "enum":
            bad_values = _enum_values_problem(attribute.enum_values)
            if bad_values:
                bad(f"{path}.enum_values", bad_values)
        elif attribute.enum_values:
            bad(f"{path}.enum_values", "only enum attributes take enum values")

    by_name: dict[str, Attribute] = {}
    for attribute in schema.attributes:
        by_name.setdefault(attribute.name, attribute)
    if not schema.primary_key:
        bad("entity.primary_key", "an entity needs a primary key of at least one attribute")
    key_seen: set[str] = set()
    for j, name in enumerate(schema.primary_key):
        path = f"entity.primary_key[{j}]"
        key_attribute = by_name.get(name)
        if key_attribute is None:
            bad(path, f"unknown attribute {name!r}")
        elif name in key_seen:
            bad(path, f"{name!r} is listed twice")
        elif key_attribute.nullable:
            bad(path, f"key attribute {name!r} must not be nullable")
        key_seen.add(name)

    version = by_name.get(schema.version_attribute)
    if not schema.version_attribute:
        bad("entity.version_attribute", "every entity needs a version attribute (integer or timestamp)")
    elif version is None:
        bad("entity.version_attribute", f"unknown attribute {schema.version_attribute!r}")
    elif version.type not in VERSION_TYPES:
        bad("entity.version_attribute", "the version attribute must be an integer or a timestamp")
    elif version.nullable:
        bad("entity.version_attribute", "the version attribute must not be nullable")
    elif version.name in key_seen:
        bad("entity.version_attribute", "the version attribute cannot be part of the primary key")

    if schema.identity is not None:
        identity = by_name.get(schema.identity.attribute)
        if not schema.identity.attribute:
            bad("entity.identity.attribute", "the identity attribute must be set")
        elif identity is None:
            bad("entity.identity.attribute", f"unknown attribute {schema.identity.attribute!r}")
        elif identity.nullable:
            bad("entity.identity.attribute", "the identity attribute must not be nullable")
        if not schema.identity.namespace.strip():
            bad("entity.identity.namespace", "the identity namespace must be set")
        elif len(schema.identity.namespace) > MAX_NAMESPACE:
            bad("entity.identity.namespace", f"namespaces have at most {MAX_NAMESPACE} characters")
    found += _link_violations(schema, by_name, existing.links if existing is not None else ())
    return found


def _link_violations(
    schema: EntitySchema, by_name: dict[str, Attribute], old_links: tuple[Link, ...]
) -> list[FieldViolation]:
    found: list[FieldViolation] = []
    if len(schema.links) > MAX_LINKS:
        found.append(FieldViolation("entity.links", f"an entity has at most {MAX_LINKS} links"))
    seen: set[str] = set()
    for i, link in enumerate(schema.links):
        path = f"entity.links[{i}]"
        if not ATTRIBUTE_NAME_PATTERN.match(link.name):
            found.append(
                FieldViolation(
                    f"{path}.name", "link names are 1-63 characters of a-z, 0-9 and _, starting with a letter"
                )
            )
        elif link.name in seen:
            found.append(FieldViolation(f"{path}.name", f"duplicate link name {link.name!r}"))
        elif link.name in by_name:
            found.append(FieldViolation(f"{path}.name", f"{link.name!r} is already the name of an attribute"))
        elif link.name == MESSAGE_LOGS and link not in old_links:
            found.append(FieldViolation(f"{path}.name", f"{MESSAGE_LOGS!r} is the name of the built-in link"))
        seen.add(link.name)
        if link.cardinality not in LINK_CARDINALITIES:
            found.append(FieldViolation(f"{path}.cardinality", "the cardinality must be MANY_TO_ONE or ONE_TO_MANY"))
        if not link.target:
            found.append(FieldViolation(f"{path}.target", "the target entity must be set"))
        if not link.join:
            found.append(FieldViolation(f"{path}.join", "a link joins at least one pair of attributes"))
        local_seen: set[str] = set()
        for j, pair in enumerate(link.join):
            if pair.attribute not in by_name:
                found.append(FieldViolation(f"{path}.join[{j}].attribute", f"unknown attribute {pair.attribute!r}"))
            elif pair.attribute in local_seen:
                found.append(FieldViolation(f"{path}.join[{j}].attribute", f"{pair.attribute!r} is joined twice"))
            local_seen.add(pair.attribute)
    return found


def compatible_types(left: Attribute, right: Attribute) -> bool:
    """Whether two attributes can be joined: the same type, string and enum counting as one."""
    families = {"enum": "string"}
    return families.get(left.type, left.type) == families.get(right.type, right.type)


def link_target_violations(
    schema: EntitySchema, target_of: dict[str, EntitySchema | None], path: str = "entity.links"
) -> list[FieldViolation]:
    """The violations of the links' target halves; ``target_of`` maps each target id to its schema."""
    found: list[FieldViolation] = []
    for i, link in enumerate(schema.links):
        if not link.target:
            continue
        target = target_of.get(link.target)
        if target is None:
            found.append(FieldViolation(f"{path}[{i}].target", f"entity {link.target!r} does not exist"))
            continue
        for j, pair in enumerate(link.join):
            local = schema.attribute(pair.attribute)
            remote = target.attribute(pair.target_attribute)
            if remote is None:
                found.append(
                    FieldViolation(
                        f"{path}[{i}].join[{j}].target_attribute",
                        f"unknown attribute {pair.target_attribute!r} of entity {link.target!r}",
                    )
                )
            elif local is not None and not compatible_types(local, remote):
                found.append(
                    FieldViolation(
                        f"{path}[{i}].join[{j}].target_attribute",
                        f"{pair.attribute!r} is a {local.type} but {link.target}.{pair.target_attribute} is a "
                        f"{remote.type}",
                    )
                )
        if link.cardinality == MANY_TO_ONE and sorted(p.target_attribute for p in link.join) != sorted(
            target.primary_key
        ):
            found.append(
                FieldViolation(
                    f"{path}[{i}].join",
                    f"a many-to-one link joins on the whole primary key of {link.target!r} "
                    f"({', '.join(target.primary_key)})",
                )
            )
    return found


def _enum_values_problem(values: tuple[str, ...]) -> str:
    if not values:
        return "enum attributes need at least one enum value"
    if len(values) > MAX_ENUM_VALUES:
        return f"enum attributes have at most {MAX_ENUM_VALUES} values"
    if any(not v or "\x00" in v for v in values):
        return "enum values must be non-empty strings"
    if len(set(values)) != len(values):
        return "enum values must be unique"
    return ""


_COLUMN_TYPES: dict[str, Any] = {
    "string": sa.Text,
    "enum": sa.Text,
    "integer": sa.BigInteger,
    "decimal": lambda: sa.Numeric(38, 10),
    "boolean": sa.Boolean,
    "date": sa.Date,
    "timestamp": lambda: sa.DateTime(timezone=True),
}


def column_type(attribute_type: str) -> sa.types.TypeEngine[Any]:
    """The SQLAlchemy column type of an attribute type."""
    made: sa.types.TypeEngine[Any] = _COLUMN_TYPES[attribute_type]()
    return made


def entity_table(table_name: str, schema: EntitySchema) -> sa.Table:
    """The Core table of an entity, on its own MetaData: one column per attribute, the declared key."""
    columns = [
        sa.Column(a.name, column_type(a.type), nullable=a.nullable, autoincrement=False) for a in schema.attributes
    ]
    indexed = {tuple(pair.attribute for pair in link.join) for link in schema.links if link.cardinality == MANY_TO_ONE}
    indexes = [sa.Index(link_index_name(table_name, list(names)), *names) for names in sorted(indexed)]
    return sa.Table(table_name, sa.MetaData(), *columns, sa.PrimaryKeyConstraint(*schema.primary_key), *indexes)


def link_index_name(table_name: str, columns: list[str]) -> str:
    """The name of the index a link needs on ``columns`` of ``table_name``, derived from both."""
    digest = hashlib.sha1(f"{table_name}:{','.join(columns)}".encode(), usedforsecurity=False).hexdigest()
    return f"ix_link_{digest[:24]}"


def definition_to_json(schema: EntitySchema) -> str:
    """The JSON form of a schema, as stored in the catalog (the display name is stored apart)."""
    return json.dumps(
        {
            "attributes": [
                {"name": a.name, "type": a.type, "nullable": a.nullable, "enum_values": list(a.enum_values)}
                for a in schema.attributes
            ],
            "primary_key": list(schema.primary_key),
            "version_attribute": schema.version_attribute,
            "identity": (
                None
                if schema.identity is None
                else {"attribute": schema.identity.attribute, "namespace": schema.identity.namespace}
            ),
            "links": [
                {
                    "name": link.name,
                    "target": link.target,
                    "cardinality": link.cardinality,
                    "join": [[pair.attribute, pair.target_attribute] for pair in link.join],
                }
                for link in schema.links
            ],
        },
        separators=(",", ":"),
    )


def definition_from_json(text: str, display_name: str = "") -> EntitySchema:
    """The schema stored by :func:`definition_to_json`."""
    data = json.loads(text)
    identity = data.get("identity")
    return EntitySchema(
        attributes=tuple(
            Attribute(a["name"], a["type"], bool(a["nullable"]), tuple(a["enum_values"])) for a in data["attributes"]
        ),
        primary_key=tuple(data["primary_key"]),
        version_attribute=data["version_attribute"],
        identity=None if identity is None else IdentityBinding(identity["attribute"], identity["namespace"]),
        display_name=display_name,
        links=tuple(
            Link(
                name=link["name"],
                target=link["target"],
                cardinality=link["cardinality"],
                join=tuple(JoinPair(attribute, target) for attribute, target in link["join"]),
            )
            for link in data.get("links", [])
        ),
    )
