"""Planned template parts (text and lookups only) render exactly as the sandbox renders them.

A planned part is filled from its lookups instead of running its compiled code; the reference here is the
same template rendered with no plans (every part through Jinja). Both must give the same parts, or both
fail naming the same part.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator, Mapping
from decimal import Decimal
from typing import Any

import pytest
from markupsafe import Markup

from carillon_chassis.errors import InvalidArgument
from delivery_svc.eligibility import ProfileView
from delivery_svc.pipeline import profile_context
from delivery_svc.templates import (
    _DICT_ATTRIBUTES,
    _HTML_ENV,
    _TEXT_ENV,
    CompiledTemplate,
    RenderError,
    Template,
    _compile_parts,
    compile_template,
    content_parts,
    plan_part,
)


def email(**parts: str) -> Template:
    return Template(template_id="t", channel="email", content_kind="email", content=parts)


def jinja_only(template: Template) -> CompiledTemplate:
    """The template with every part rendered by its compiled code (no plans)."""
    sources = tuple((part, template.content.get(part, "")) for part in content_parts(template))
    compiled, _ = _compile_parts(template.content_kind, sources)
    return CompiledTemplate(template, compiled)


def outcome(compiled: CompiledTemplate, context: dict[str, Any]) -> dict[str, str] | str:
    try:
        return compiled.render(context)
    except RenderError as exc:
        return f"error in {exc.part}"


TEXTS = ["Hello ", ", ", "{", "}", "{{ '{' }}", "\r\n", "\n", " ", "\t", "&", "<b>", "From ", "é", "{# note #}", ""]
LOOKUPS = [
    "{{ profile.first_name }}",
    "{{ profile.last_name }}",
    "{{profile.attributes.points}}",
    "{{ profile.attributes['tier'] }}",
    "{{ target.hotel }}",
    '{{ target["hotel"] }}',
    "{{ target.nights }}",
    "{{ target.price }}",
    "{{ target.date }}",
    "{{ target.none }}",
    "{{ target.flag }}",
    "{{ target.missing }}",
    "{{ target.rooms }}",
    "{{ target.markup }}",
    "{{ target.nested.city }}",
    "{{ target.hotel.name }}",
    "{{ target.items }}",
    "{{ target.keys }}",
    "{{ unknown }}",
    "{{ range }}",
    "{{- target.hotel -}}",
    "{{ target.hotel | upper }}",
    "{% raw %}{{ x }}{% endraw %}",
]
HOTELS = ["Ritz", "Savoy & Co", "<Sacher>", "O'Hara", 'The "Adlon"', "Zoë", "  spaced  ", "line\nbreak"]


def context(rng: random.Random) -> dict[str, Any]:
    view = ProfileView(
        profile_id="p1",
        first_name=rng.choice(["Ada", "Zoë", "<b>", ""]),
        last_name=rng.choice(["Lovelace", "O'Brien & Sons"]),
        identities=(("email", "ada@example.com"),),
        attributes=rng.choice([{}, {"points": 12, "tier": "gold"}, {"points": Decimal("1.50"), "tier": None}]),
    )
    target: dict[str, Any] = {
        "hotel": rng.choice(HOTELS),
        "nights": rng.choice([0, 3, -1]),
        "price": rng.choice([Decimal("10.00"), 2.5, True]),
        "date": rng.choice([dt.date(2026, 11, 29), dt.datetime(2026, 11, 29, 10, 0, tzinfo=dt.UTC)]),
        "none": None,
        "flag": False,
        "rooms": ["a", "b"],
        "markup": Markup("<i>safe</i>"),
        "nested": rng.choice([{"city": "Paris & Nice"}, {}, "flat"]),
        "items": "an item called items",
    }
    if rng.random() < 0.2:
        del target["hotel"]
    return {"profile": profile_context(view, "ada@example.com"), "target": target}


def test_planned_parts_render_as_the_sandbox_renders_them_over_generated_templates() -> None:
    rng = random.Random(20261129)
    planned = 0
    for _ in range(600):
        parts = {}
        for part in ("subject", "text_body", "html_body"):
            pieces = [rng.choice(TEXTS + LOOKUPS) for _ in range(rng.randint(0, 6))]
            parts[part] = "".join(pieces) or "x"
        template = email(**parts)
        try:
            fast, reference = compile_template(template), jinja_only(template)
        except InvalidArgument:  # pieces that make up a broken tag ("{" then "{# note #}")
            continue
        planned += sum(step[2] is not None for step in fast._steps)
        for _ in range(3):
            values = context(rng)
            assert outcome(fast, values) == outcome(reference, values), parts
    assert planned > 300  # the generated templates do exercise the plans


def test_a_part_of_text_and_lookups_is_planned_and_anything_else_is_not() -> None:
    assert plan_part(_TEXT_ENV, "Hi {{ profile.first_name }}, {{ target['hotel'] }} {}") is not None
    for source in (
        "{% if x %}a{% endif %}",
        "{{ x | upper }}",
        "{{ x() }}",
        "{{ x.y() }}",
        "{{ 'a' }}",
        "{{ x + 1 }}",
        "{{ x[0] }}",
        "{{ profile.items }}",
        "{{ profile.__class__ }}",
        "{{ self }}",
        "{{ loop.index }}",
        "{% set a = 1 %}{{ a }}",
    ):
        assert plan_part(_TEXT_ENV, source) is None, source
        assert plan_part(_HTML_ENV, source) is None, source


def test_braces_and_line_ends_of_a_planned_part_are_written_as_jinja_writes_them() -> None:
    template = email(
        subject="{x}", text_body="a {{ '{}' }} {}\r\nb {{ target.hotel }}}\r", html_body="{{target.hotel}}{"
    )
    context = {"profile": {}, "target": {"hotel": "{0} & {}"}}

    assert compile_template(template).render(context) == jinja_only(template).render(context)
    assert compile_template(template).render(context)["html_body"] == "{0} &amp; {}{"


def test_a_planned_lookup_that_is_undefined_fails_the_part_as_in_the_sandbox() -> None:
    compiled = compile_template(email(subject="Hi", text_body="{{ target.missing }}"))

    with pytest.raises(RenderError) as caught:
        compiled.render({"profile": {}, "target": {}})

    assert caught.value.part == "text_body"
    assert "UndefinedError" in str(caught.value)


def test_dict_attributes_and_unsafe_names_still_go_through_the_sandbox() -> None:
    compiled = compile_template(email(subject="Hi", text_body="{{ target.__class__ }}"))

    with pytest.raises(RenderError) as caught:
        compiled.render({"profile": {}, "target": {"__class__": "x"}})
    assert "SecurityError" in str(caught.value)
    rendered = compile_template(email(subject="Hi", text_body="{{ target.items }}")).render({"target": {"items": 1}})
    assert rendered["text_body"].startswith("<built-in method items of dict object")


def test_the_names_a_dict_has_as_attributes_are_exactly_the_listed_ones() -> None:
    names = set(dir(dict)) | set(dir(object)) | {"__dict__", "__weakref__", "mro", "__name__", "hotel", "first_name"}

    assert {name for name in names if hasattr({}, name)} == set(_DICT_ATTRIBUTES)


def test_the_profile_variable_takes_the_first_identity_of_each_namespace() -> None:
    view = ProfileView(
        profile_id="p1",
        first_name="Ada",
        identities=(("phone", "+4411"), ("email", "ada@example.com"), ("email", "other@example.com"), ("phone", "+33")),
        attributes={"tier": "gold"},
    )

    context = profile_context(view, "ada@example.com")

    assert (context["email"], context["phone"], context["name"], context["attributes"]) == (
        "ada@example.com",
        "+4411",
        "profiles/p1",
        {"tier": "gold"},
    )
    assert context["attributes"] is not view.attributes
    assert profile_context(ProfileView(profile_id="p2"), "bob@example.com")["email"] == "bob@example.com"
    assert profile_context(ProfileView(profile_id="p3"), "+4412")["email"] == ""


class OddContext(Mapping[str, Any]):
    """A context whose ``get`` fails (the plans use it; Jinja copies the context by its keys)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def get(self, key: str, default: Any = None) -> Any:
        raise RuntimeError("odd")


def test_a_context_the_plans_cannot_read_is_rendered_by_the_sandbox() -> None:
    template = email(subject="Hi {{ profile.first_name }}", text_body="{{ target.hotel }}")

    rendered = compile_template(template).render(
        OddContext({"profile": {"first_name": "Ada"}, "target": {"hotel": "Ritz"}})
    )

    assert rendered == {"subject": "Hi Ada", "text_body": "Ritz"}
