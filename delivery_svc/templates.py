"""Message templates: validation, compilation and rendering in a Jinja2 sandbox, and their store.

Every part of a template is a Jinja2 template compiled in an immutable sandboxed environment with
``StrictUndefined``: an undefined variable is an error (``| default(...)`` still works), an unsafe
attribute (``''.__class__``) is an error, and huge string or power operations are refused. HTML parts
are autoescaped, the other parts are not. A template is compiled when it is created, so a syntax error
is reported then, naming the part (``template.email.subject``). A part made only of text and variable
lookups (``Hi {{ profile.first_name }}``) is also planned: while its lookups end on plain values of plain
dicts, it is filled from them without running its code, with the very text the sandbox would write
(tests/unit/test_delivery_fast_templates.py); anything else runs in the sandbox.

Rendering context: ``profile`` (id, name, first_name, last_name, locale, time_zone, email, phone,
attributes) and ``target`` (the recipient's working-set row as Python values).
"""

from __future__ import annotations

import datetime as dt
import functools
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from types import MappingProxyType
from typing import Any

import sqlalchemy as sa
from jinja2 import StrictUndefined, TemplateError, nodes
from jinja2 import Template as JinjaTemplate
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context, new_context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import escape

from carillon_chassis.database import Database, as_utc, utcnow
from carillon_chassis.errors import AlreadyExists, FieldViolation, InvalidArgument, NotFound
from carillon_chassis.names import validate_id
from carillon_chassis.pagination import keyset_page
from delivery_svc.tables import TemplateRow

CHANNELS = ("email", "sms", "push", "direct_mail")
# The parts of each kind of content, and the channel each kind is for.
CONTENT_PARTS: dict[str, tuple[str, ...]] = {
    "email": ("subject", "html_body", "text_body", "sender_name", "sender_address"),
    "sms": ("text", "sender"),
    "push": ("title", "body", "deep_link"),
    "direct_mail": (),  # its parts are its columns: header -> value template, in order
}
CONTENT_CHANNEL = {"email": "email", "sms": "sms", "push": "push", "direct_mail": "direct_mail"}
MAX_EXTRACT_COLUMNS = 50  # the message id column included
MAX_COLUMN_HEADER_CHARS = 63
# Parts rendered with HTML autoescaping.
HTML_PARTS = frozenset({"html_body"})
# Parts that end up in a single-line header: whitespace runs (newlines included) become one space.
SINGLE_LINE_PARTS = frozenset({"subject", "sender_name", "sender_address", "sender", "title", "deep_link"})

# A push template's custom data: part "data.{key}" per key, sent in the notification's data.
PUSH_DATA_PREFIX = "data."
MAX_PUSH_DATA_KEYS = 20
_PUSH_DATA_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,63}$")
_RESERVED_PUSH_DATA_KEYS = frozenset({"deep_link", "carillon_message_id", "aps", "from", "message_type"})

MAX_PART_CHARS = 100_000
MAX_RENDERED_CHARS = 1_000_000
MAX_DISPLAY_NAME_CHARS = 200
_MAX_EXPONENT = 128


class RenderError(Exception):
    """A template part could not be rendered for one recipient (undefined variable, sandbox violation...)."""

    def __init__(self, part: str, message: str) -> None:
        super().__init__(f"{part}: {message}")
        self.part = part


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox of every template: immutable, strict about undefined names, bounded operators."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Context, operator_name: str, left: Any, right: Any) -> Any:
        if operator_name == "**":
            if isinstance(right, int | float) and abs(right) > _MAX_EXPONENT:
                raise SecurityError("exponent too large")
            return operator.pow(left, right)
        for seq, count in ((left, right), (right, left)):
            if isinstance(seq, str | list | tuple) and isinstance(count, int) and len(seq) * count > MAX_RENDERED_CHARS:
                raise SecurityError("sequence repetition too large")
        return operator.mul(left, right)

    def getattr(self, obj: Any, attribute: str) -> Any:
        """``obj.attribute``: for a plain dict and a name that is not one of its attributes, the item (or
        undefined), which is what the sandbox's lookup ends up with after a failed ``getattr`` (an
        exception per variable of every recipient); anything else goes through the sandbox."""
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except (TypeError, LookupError):
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)


# The names that ``getattr`` finds on a dict (methods, dunders): ``d.items`` is the method, not an item.
_DICT_ATTRIBUTES = frozenset(name for name in dir(dict) if hasattr({}, name))

_TEXT_ENV = _Sandbox(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
_HTML_ENV = _Sandbox(undefined=StrictUndefined, autoescape=True, keep_trailing_newline=True)


@dataclass
class Template:
    """A template as the domain sees it: its channel and the named parts of its content."""

    template_id: str
    channel: str
    content_kind: str
    content: dict[str, str] = field(default_factory=dict)
    display_name: str = ""
    create_time: datetime | None = None

    @property
    def name(self) -> str:
        """The resource name, ``templates/{template}``."""
        return f"templates/{self.template_id}"


@dataclass(frozen=True)
class Plan:
    """A part made only of text and variable lookups (``Hi {{ profile.first_name }}``): the text as a
    format string with a ``{}`` per lookup, and each lookup's path (a context variable, then the keys)."""

    format: str
    lookups: tuple[tuple[str, tuple[str, ...]], ...]


# Values a lookup may end on to be written by the plan, as ``str(value)`` (escaped in HTML parts), which
# is what the sandbox's output does with them; anything else (Markup, lists, objects) renders in Jinja.
_PLAIN_VALUES = frozenset({str, int, float, bool, type(None), Decimal, dt.date, dt.datetime})
# Names the generated code does not resolve from the context.
_SPECIAL_NAMES = frozenset({"self", "loop", "caller", "varargs", "kwargs", "super"})
_MISSING = object()


def plan_part(env: ImmutableSandboxedEnvironment, source: str) -> Plan | None:
    """The plan of a part that is only text and ``{{ name.key["key"] }}`` lookups, None for any other part
    (tags, filters, tests, calls, operators, literals, or a ``.name`` that a dict has as an attribute)."""
    pieces: list[str] = []
    lookups: list[tuple[str, tuple[str, ...]]] = []
    for node in env.parse(source).body:
        if type(node) is not nodes.Output:
            return None
        for child in node.nodes:
            if type(child) is nodes.TemplateData:
                # The text as the compiled template writes it (line ends normalised), braces doubled.
                pieces.append(child.data.replace("{", "{{").replace("}", "}}"))
                continue
            path = _lookup_path(child)
            if path is None:
                return None
            pieces.append("{}")
            lookups.append((path[0], path[1:]))
    return Plan("".join(pieces), tuple(lookups))


def _lookup_path(node: nodes.Node) -> tuple[str, ...] | None:
    keys: list[str] = []
    while True:
        if type(node) is nodes.Getattr and node.ctx == "load" and node.attr not in _DICT_ATTRIBUTES:
            keys.append(node.attr)
            node = node.node
        elif (
            type(node) is nodes.Getitem
            and node.ctx == "load"
            and type(node.arg) is nodes.Const
            and type(node.arg.value) is str
        ):
            keys.append(node.arg.value)
            node = node.node
        elif type(node) is nodes.Name and node.ctx == "load" and node.name not in _SPECIAL_NAMES:
            keys.append(node.name)
            keys.reverse()
            return tuple(keys)
        else:
            return None


def _lookup_text(context: Mapping[str, Any], name: str, keys: tuple[str, ...]) -> str | None:
    """What the sandbox writes for ``{{ name.key... }}`` in a text part: ``str`` of a plain value reached
    through plain dicts; None when the lookup goes anywhere else (a name missing from ``context``, a key
    missing, a value of another type), for Jinja to render, or to report the error."""
    value = context.get(name, _MISSING)
    for key in keys:
        if type(value) is not dict:
            return None
        value = value.get(key, _MISSING)
    kind = type(value)
    if kind is str:
        return value  # type: ignore[no-any-return]
    return str(value) if kind in _PLAIN_VALUES else None


def _html_text(text: str | None) -> str | None:
    """What the sandbox writes for the same lookup in an HTML part: the text escaped by markupsafe."""
    if text is None or _HTML_SPECIAL.search(text) is None:
        return text
    return str(escape(text))


# The characters markupsafe's escape replaces (a text without any is written as it is).
_HTML_SPECIAL = re.compile("[&<>'\"]")


class CompiledTemplate:
    """A template whose parts are compiled, ready to render once per recipient.

    A part made only of text and variable lookups (most personalisation) renders from its :class:`Plan`:
    the distinct lookups of all such parts are resolved once per recipient, and each part is its format
    string filled with their text (escaped in HTML parts) — what the sandbox writes, at a tenth of the
    cost of running the compiled code. Any other part, or a planned one with a lookup that does not end
    on a plain value, runs in the sandbox. There, rendering builds the variables of a recipient (the
    environment's globals and ``context``) once for all the parts, where ``jinja2.Template.render`` copies
    the context and flattens the globals again for every part.
    """

    def __init__(
        self, template: Template, parts: Mapping[str, JinjaTemplate], plans: Mapping[str, Plan | None] | None = None
    ) -> None:
        self.template = template
        self._parts = dict(parts)
        # The globals of each part's environment, flattened once; parts of one environment share them.
        flattened: dict[int, dict[str, Any]] = {}
        self._globals = {
            part: flattened.setdefault(id(compiled.environment), dict(compiled.globals))
            for part, compiled in self._parts.items()
        }
        # The distinct lookups of the planned parts, and per part: (name, compiled, format string or None,
        # the indexes of its lookups, HTML-escaped, single-line).
        lookups: dict[tuple[str, tuple[str, ...]], int] = {}
        self._steps: list[tuple[str, JinjaTemplate, str | None, tuple[int, ...], bool, bool]] = []
        for part, compiled in self._parts.items():
            plan = (plans or {}).get(part)
            indexes = tuple(lookups.setdefault(path, len(lookups)) for path in plan.lookups) if plan else ()
            fmt = plan.format if plan else None
            self._steps.append((part, compiled, fmt, indexes, part in HTML_PARTS, part in SINGLE_LINE_PARTS))
        self._lookups = tuple(lookups)

    def render(self, context: Mapping[str, Any]) -> dict[str, str]:
        """Every part rendered with ``context``; raises RenderError naming the first part that fails."""
        rendered: dict[str, str] = {}
        try:
            texts = [_lookup_text(context, name, keys) for name, keys in self._lookups]
        except Exception:  # an odd mapping in the context: the sandbox renders every part (and reports)
            texts = [None] * len(self._lookups)
        html_texts: list[str | None] | None = None
        variables: dict[int, dict[str, Any]] | None = None  # per environment: its globals, then ``context``
        for part, compiled, fmt, indexes, html, single_line in self._steps:
            text = None
            if fmt is not None:
                if html and html_texts is None:
                    html_texts = [_html_text(t) for t in texts]
                values = [(html_texts if html_texts is not None and html else texts)[i] for i in indexes]
                if None not in values:
                    text = fmt.format(*values)
            if text is None:
                if variables is None:
                    variables = {}
                globals_ = self._globals[part]
                parent = variables.get(id(globals_))
                if parent is None:
                    parent = variables[id(globals_)] = {**globals_, **context}
                try:
                    # What jinja2.Template.render does, with the variables shared by the parts (a template
                    # assigns to its own context, never to them).
                    text = compiled.environment.concat(
                        compiled.root_render_func(
                            new_context(compiled.environment, compiled.name, compiled.blocks, parent, shared=True)
                        )
                    )
                except Exception as exc:  # template code is user code: any failure is a render error
                    raise RenderError(part, f"{type(exc).__name__}: {exc}") from exc
            if len(text) > MAX_RENDERED_CHARS:
                raise RenderError(part, f"rendered text exceeds {MAX_RENDERED_CHARS} characters")
            if single_line:
                text = " ".join(text.split())
            rendered[part] = text
        return rendered


def content_parts(template: Template) -> tuple[str, ...]:
    """The part names of a template: fixed per kind, or a direct-mail template's column headers."""
    if template.content_kind == "direct_mail":
        return tuple(template.content)
    if template.content_kind == "push":
        data = tuple(part for part in template.content if part.startswith(PUSH_DATA_PREFIX))
        return CONTENT_PARTS["push"] + data
    return CONTENT_PARTS.get(template.content_kind, ())


def _field(kind: str, part: str) -> str:
    return f"template.{kind}.{part}"


def validate_template(template: Template) -> list[FieldViolation]:
    """Every problem of a new template that is not about compiling its parts."""
    violations: list[FieldViolation] = []
    if template.channel not in CHANNELS:
        violations.append(FieldViolation("template.channel", "channel must be set"))
    if len(template.display_name) > MAX_DISPLAY_NAME_CHARS:
        violations.append(FieldViolation("template.display_name", f"at most {MAX_DISPLAY_NAME_CHARS} characters"))
    kind = template.content_kind
    if kind not in CONTENT_PARTS:
        violations.append(FieldViolation("template.content", "the content must be set"))
        return violations
    if template.channel in CHANNELS and CONTENT_CHANNEL[kind] != template.channel:
        violations.append(
            FieldViolation("template.channel", f"{kind} content does not match channel {template.channel!r}")
        )
    for part, text in template.content.items():
        if len(text) > MAX_PART_CHARS:
            violations.append(FieldViolation(_field(kind, part), f"at most {MAX_PART_CHARS} characters"))
    if kind == "email":
        if not template.content.get("subject", "").strip():
            violations.append(FieldViolation(_field(kind, "subject"), "a subject is required"))
        if not template.content.get("html_body") and not template.content.get("text_body"):
            for part in ("html_body", "text_body"):
                violations.append(FieldViolation(_field(kind, part), "an HTML or a text body is required"))
    if kind == "direct_mail":
        if not template.content:
            violations.append(FieldViolation(_field(kind, "columns"), "at least one column is required"))
        if len(template.content) > MAX_EXTRACT_COLUMNS - 1:
            violations.append(
                FieldViolation(
                    _field(kind, "columns"),
                    f"at most {MAX_EXTRACT_COLUMNS - 1} columns (the extract adds the message id column)",
                )
            )
        for header in template.content:
            if not header.strip() or len(header) > MAX_COLUMN_HEADER_CHARS or header == "message_id":
                violations.append(
                    FieldViolation(_field(kind, "columns"), f"a bad column header {header[:MAX_COLUMN_HEADER_CHARS]!r}")
                )
    if kind == "push" and not template.content.get("body", "").strip():
        violations.append(FieldViolation(_field(kind, "body"), "a body is required"))
    if kind == "push":
        violations += _push_data_violations(template)
    if kind == "sms" and not template.content.get("text", "").strip():
        violations.append(FieldViolation(_field(kind, "text"), "a text is required"))
    return violations


def _push_data_violations(template: Template) -> list[FieldViolation]:
    keys = [part.removeprefix(PUSH_DATA_PREFIX) for part in template.content if part.startswith(PUSH_DATA_PREFIX)]
    violations: list[FieldViolation] = []
    if len(keys) > MAX_PUSH_DATA_KEYS:
        violations.append(FieldViolation(_field("push", "data"), f"at most {MAX_PUSH_DATA_KEYS} keys"))
    for key in keys:
        lowered = key.lower()
        if (
            not _PUSH_DATA_KEY.match(key)
            or lowered in _RESERVED_PUSH_DATA_KEYS
            or lowered.startswith(("google", "gcm"))
        ):
            violations.append(FieldViolation(_field("push", "data"), f"a bad or reserved data key {key[:63]!r}"))
    return violations


def compile_template(template: Template) -> CompiledTemplate:
    """Compile every non-empty part; a syntax error is InvalidArgument naming each failing part.

    Compiled parts are cached by content (a template version), so that every Send stream and preview
    of the same template after the first skips the compilation (about a millisecond per template)."""
    sources = tuple((part, template.content.get(part, "")) for part in content_parts(template))
    compiled, plans = _compile_parts(template.content_kind, sources)
    return CompiledTemplate(template, compiled, plans)


@functools.lru_cache(maxsize=256)
def _compile_parts(
    kind: str, sources: tuple[tuple[str, str], ...]
) -> tuple[Mapping[str, JinjaTemplate], Mapping[str, Plan | None]]:
    """The compiled non-empty parts of a content and their plans (cached; a content that does not compile
    is not)."""
    compiled: dict[str, JinjaTemplate] = {}
    plans: dict[str, Plan | None] = {}
    violations: list[FieldViolation] = []
    for part, source in sources:
        if not source:
            continue
        env = _HTML_ENV if part in HTML_PARTS else _TEXT_ENV
        try:
            compiled[part] = env.from_string(source)
            plans[part] = plan_part(env, source)
        except TemplateError as exc:
            line = getattr(exc, "lineno", None)
            where = f" (line {line})" if line else ""
            violations.append(FieldViolation(_field(kind, part), f"does not compile{where}: {exc.message or exc}"))
        except RecursionError:
            violations.append(FieldViolation(_field(kind, part), "is nested too deeply"))
    if violations:
        raise InvalidArgument("the template does not compile", violations=violations, reason="TEMPLATE_SYNTAX_ERROR")
    return MappingProxyType(compiled), MappingProxyType(plans)


def check_new_template(template_id: str, template: Template) -> CompiledTemplate:
    """Validate a template about to be created and compile it (InvalidArgument lists every problem)."""
    violations: list[FieldViolation] = []
    try:
        validate_id(template_id, "template_id")
    except InvalidArgument as exc:
        violations += exc.violations
    violations += validate_template(template)
    if violations:
        raise InvalidArgument("invalid template", violations=violations, reason="INVALID_TEMPLATE")
    return compile_template(template)


def _from_row(row: sa.RowMapping) -> Template:
    stored = dict(row["content"] or {})
    kind = str(stored.pop("kind", ""))
    return Template(
        template_id=row["template_id"],
        channel=row["channel"],
        content_kind=kind,
        content={k: str(v) for k, v in stored.items()},
        display_name=row["display_name"],
        create_time=as_utc(row["create_time"]),
    )


class TemplateStore:
    """The templates of one database, per sandbox."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._table: sa.Table = TemplateRow.__table__  # type: ignore[attr-defined]

    def create(self, sandbox: str, template_id: str, template: Template) -> Template:
        """Validate, compile and store a new template; ALREADY_EXISTS when the id is taken."""
        check_new_template(template_id, template)
        parts = content_parts(template)
        created = Template(
            template_id=template_id,
            channel=template.channel,
            content_kind=template.content_kind,
            content={part: template.content.get(part, "") for part in parts},
            display_name=template.display_name,
            create_time=utcnow(),
        )
        row = {
            "sandbox": sandbox,
            "template_id": template_id,
            "channel": created.channel,
            "display_name": created.display_name,
            "content": {"kind": created.content_kind, **created.content},
            "create_time": created.create_time,
        }
        taken = AlreadyExists(
            f"template {template_id!r} already exists", field="template_id", reason="TEMPLATE_ALREADY_EXISTS"
        )
        try:
            with self.database.engine.begin() as conn:
                exists = conn.execute(
                    sa.select(self._table.c.template_id).where(
                        self._table.c.sandbox == sandbox, self._table.c.template_id == template_id
                    )
                ).first()
                if exists is not None:
                    raise taken
                conn.execute(self._table.insert().values(**row))
        except sa.exc.IntegrityError as exc:
            raise taken from exc
        return created

    def get(self, sandbox: str, template_id: str, *, field_name: str = "name") -> Template:
        """One template; NOT_FOUND naming ``field_name`` when it does not exist."""
        with self.database.engine.connect() as conn:
            row = (
                conn.execute(
                    sa.select(self._table).where(
                        self._table.c.sandbox == sandbox, self._table.c.template_id == template_id
                    )
                )
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound(f"template {template_id!r} does not exist", field=field_name, reason="TEMPLATE_NOT_FOUND")
        return _from_row(row)

    def list(self, sandbox: str, size: int, token: str) -> tuple[list[Template], str]:
        """One page of templates in id order and the token of the next page ("" on the last)."""
        table = self._table
        with self.database.engine.connect() as conn:
            rows, next_token = keyset_page(conn, table, table.c.template_id, [table.c.sandbox == sandbox], size, token)
        return [_from_row(r) for r in rows], next_token
