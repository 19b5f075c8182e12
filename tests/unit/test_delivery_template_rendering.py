"""Rendering a compiled template many times: compiled parts cached by content, variables shared by parts."""

from __future__ import annotations

from typing import Any

import pytest

from carillon_chassis.errors import InvalidArgument
from delivery_svc.templates import Template, compile_template

CONTEXT: dict[str, dict[str, Any]] = {"profile": {"first_name": "Ada"}, "target": {"hotel": "Ritz"}}


def email(template_id: str = "welcome", **parts: str) -> Template:
    content = {"subject": "Hello", "text_body": "Hi", **parts}
    return Template(template_id=template_id, channel="email", content_kind="email", content=content)


def test_two_templates_with_the_same_content_each_keep_their_own_identity() -> None:
    first = compile_template(email("first", text_body="Hi {{ profile.first_name }}"))
    second = compile_template(email("second", text_body="Hi {{ profile.first_name }}"))

    assert (first.template.template_id, second.template.template_id) == ("first", "second")
    assert first.render(CONTEXT) == second.render(CONTEXT) == {"subject": "Hello", "text_body": "Hi Ada"}


def test_a_content_that_does_not_compile_is_refused_every_time() -> None:
    broken = email(text_body="{% if %}")

    for _ in range(2):
        with pytest.raises(InvalidArgument) as caught:
            compile_template(broken)
        assert caught.value.reason == "TEMPLATE_SYNTAX_ERROR"


def test_a_variable_set_in_one_part_is_not_visible_in_another() -> None:
    compiled = compile_template(
        email(subject="{% set hotel = 'Savoy' %}{{ hotel }}", text_body="{{ target.hotel }} {{ hotel | default('-') }}")
    )

    assert compiled.render(CONTEXT) == {"subject": "Savoy", "text_body": "Ritz -"}


def test_the_jinja_globals_are_available_in_every_part() -> None:
    compiled = compile_template(
        email(
            subject="{% for i in range(2) %}{{ i }}{% endfor %}",
            text_body="{{ range(3) | list | length }}",
            html_body="<p>{{ dict(a=1)['a'] }}</p>",
        )
    )

    assert compiled.render(CONTEXT) == {"subject": "01", "text_body": "3", "html_body": "<p>1</p>"}


def test_rendering_never_changes_the_context_it_is_given() -> None:
    context: dict[str, Any] = {"profile": {"first_name": "Ada"}, "target": {"hotel": "Ritz"}}
    compiled = compile_template(email(subject="{% set profile = 'x' %}{{ profile }}", text_body="{{ target.hotel }}"))

    for _ in range(2):
        assert compiled.render(context) == {"subject": "x", "text_body": "Ritz"}
    assert context == {"profile": {"first_name": "Ada"}, "target": {"hotel": "Ritz"}}
