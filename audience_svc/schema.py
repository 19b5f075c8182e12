"""Entity schemas: their validation, their JSON form in the catalog and their SQLAlchemy tables.

An entity is a user-defined record type stored in a real table. Its schema names typed attributes
(the table's columns, in order), a primary key, a version attribute (integer or timestamp: the
highest version of a record wins) and, for a targeting dimension, an identity binding (which
attribute identifies a person, in which namespace). Schemas are validated before anything is
written, and every violation names the field of the request that holds it
(``entity.attributes[2].type``).

Attribute types map to portable column types: ``string`` and ``enum`` to TEXT, ``integer`` to
BIGINT, ``decimal`` to NUMERIC(38, 10) (stored as a floating-point number by SQLite, so about 15
significant digits survive there), ``boolean``, ``date`` and ``timestamp`` (UTC) to their own types.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

import sqlalchemy as sa

from audience_svc.violations import invalid_argument
from carillon_chassis.errors import FieldViolation

ATTRIBUTE_TYPES = ("string", "integer", "decimal", "boolean", "date", "timestamp", "enum")
STRING_TYPES = ("string", "enum")
VERSION_TYPES = ("integer", "timestamp")
ENTITY_ID_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,40}$")
ATTRIBUTE_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
MAX_ATTRIBUTES = 1000
MAX_ENUM_VALUES = 1000
MAX_DISPLAY_NAME = 200
MAX_NAMESPACE = 63


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
class EntitySchema:
    """The user-defined part of an entity: attributes, primary key, version and identity."""

    attributes: tuple[Attribute, ...]
    primary_key: tuple[str, ...]
    version_attribute: str
    identity: IdentityBinding | None = None
    display_name: str = ""

    def attribute(self, name: str) -> Attribute | None:
        """The attribute called ``name``, or None."""
        return self._by_name.get(name)

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


def validate_schema(entity_id: str, schema: EntitySchema) -> None:
    """Raise InvalidArgument listing every violation of the id and schema; return when both are valid."""
    violations = validate_entity_id(entity_id)
    violations += _schema_violations(schema)
    if violations:
        raise invalid_argument(f"the entity schema has {len(violations)} problem(s)", violations, "INVALID_ENTITY")


def _schema_violations(schema: EntitySchema) -> list[FieldViolation]:
    found: list[FieldViolation] = []

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
    return sa.Table(table_name, sa.MetaData(), *columns, sa.PrimaryKeyConstraint(*schema.primary_key))


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
    )
