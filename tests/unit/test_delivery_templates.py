"""Templates: compilation at creation, rendering in the Jinja2 sandbox."""

from __future__ import annotations

from typing import Any

import pytest

from carillon_chassis.errors import InvalidArgument
from delivery_svc.templates import RenderError, Template, check_new_template, compile_template


def email(**parts: str) -> Template:
    content = {"subject": "Hello", "text_body": "Hi", **parts}
    return Template(template_id="welcome", channel="email", content_kind="email", content=content)


CONTEXT: dict[str, dict[str, Any]] = {
    "profile": {"id": "p1", "first_name": "Ada", "last_name": "Lovelace", "email": "ada@example.com"},
    "target": {"hotel": "Ritz <Paris>", "nights": 3},
}


def violation_fields(error: InvalidArgument) -> set[str]:
    return {v.field for v in error.violations}


def test_parts_are_personalised_with_the_profile_and_the_target() -> None:
    compiled = compile_template(
        email(
            subject="{{ profile.first_name }}, your stay", text_body="{{ target.nights }} nights at {{ target.hotel }}"
        )
    )

    parts = compiled.render(CONTEXT)

    assert parts["subject"] == "Ada, your stay"
    assert parts["text_body"] == "3 nights at Ritz <Paris>"


def test_the_html_body_is_autoescaped() -> None:
    compiled = compile_template(email(html_body="<p>{{ target.hotel }}</p>"))

    assert compiled.render(CONTEXT)["html_body"] == "<p>Ritz &lt;Paris&gt;</p>"


def test_the_subject_and_the_text_body_are_not_autoescaped() -> None:
    compiled = compile_template(email(subject="{{ target.hotel }}", text_body="{{ target.hotel }}"))

    parts = compiled.render(CONTEXT)

    assert parts["subject"] == "Ritz <Paris>"
    assert parts["text_body"] == "Ritz <Paris>"


def test_an_undefined_variable_is_a_render_error_naming_the_part() -> None:
    compiled = compile_template(email(text_body="Hi {{ profile.nickname }}"))

    with pytest.raises(RenderError) as caught:
        compiled.render(CONTEXT)

    assert caught.value.part == "text_body"


def test_the_default_filter_still_fills_an_undefined_variable() -> None:
    compiled = compile_template(email(text_body="Hi {{ profile.nickname | default('friend') }}"))

    assert compiled.render(CONTEXT)["text_body"] == "Hi friend"


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ target.__class__.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os }}",
    ],
)
def test_a_sandbox_escape_attempt_is_a_render_error(source: str) -> None:
    compiled = compile_template(email(text_body=source))

    with pytest.raises(RenderError):
        compiled.render(CONTEXT)


def test_a_template_cannot_mutate_the_context() -> None:
    compiled = compile_template(email(text_body="{{ target.update({'nights': 9}) }}"))

    with pytest.raises(RenderError):
        compiled.render(CONTEXT)
    assert CONTEXT["target"]["nights"] == 3


def test_a_huge_string_repetition_is_a_render_error() -> None:
    compiled = compile_template(email(text_body="{{ 'x' * 100000000 }}"))

    with pytest.raises(RenderError):
        compiled.render(CONTEXT)


def test_a_newline_in_a_rendered_subject_cannot_start_a_new_header() -> None:
    compiled = compile_template(email(subject="{{ target.hotel }}"))

    parts = compiled.render({**CONTEXT, "target": {"hotel": "Ritz\r\nBcc: victim@example.com"}})

    assert parts["subject"] == "Ritz Bcc: victim@example.com"


def test_a_syntax_error_at_creation_names_the_failing_part() -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_new_template("welcome", email(subject="Hello {{ profile.first_name"))

    assert caught.value.reason == "TEMPLATE_SYNTAX_ERROR"
    assert violation_fields(caught.value) == {"template.email.subject"}


def test_every_part_with_a_syntax_error_is_named() -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_new_template("welcome", email(html_body="{% if %}", text_body="{{ }}"))

    assert violation_fields(caught.value) == {"template.email.html_body", "template.email.text_body"}


def test_an_email_template_needs_a_body() -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_new_template("welcome", email(text_body=""))

    assert caught.value.reason == "INVALID_TEMPLATE"
    assert violation_fields(caught.value) == {"template.email.html_body", "template.email.text_body"}


def test_email_content_must_match_the_template_channel() -> None:
    template = email()
    template.channel = "sms"

    with pytest.raises(InvalidArgument) as caught:
        check_new_template("welcome", template)

    assert violation_fields(caught.value) == {"template.channel"}


def test_a_template_without_a_channel_is_invalid() -> None:
    template = email()
    template.channel = ""

    with pytest.raises(InvalidArgument) as caught:
        check_new_template("welcome", template)

    assert "template.channel" in violation_fields(caught.value)


def test_a_template_without_content_is_invalid() -> None:
    template = Template(template_id="welcome", channel="email", content_kind="")

    with pytest.raises(InvalidArgument) as caught:
        check_new_template("welcome", template)

    assert violation_fields(caught.value) == {"template.content"}


def test_a_malformed_template_id_is_invalid() -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_new_template("Not An Id", email())

    assert violation_fields(caught.value) == {"template_id"}
