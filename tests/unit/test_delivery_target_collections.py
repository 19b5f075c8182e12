"""A collection enrichment in a recipient's target reaches templates as a list of records to loop over."""

from __future__ import annotations

from carillon.delivery.v1 import delivery_service_pb2
from carillon.type.v1 import value_pb2
from carillon_chassis.values import to_value
from delivery_svc.servicer import recipients_from_proto
from delivery_svc.templates import Template, compile_template


def test_a_template_loops_over_a_collection_of_the_target() -> None:
    stays = [{"hotel": "Ritz", "nights": 2}, {"hotel": "Savoy", "nights": 5}]
    batch = delivery_service_pb2.RecipientBatch(
        recipients=[
            delivery_service_pb2.Recipient(
                identity=value_pb2.Identity(namespace="email", value="ada@example.com"),
                entity_key="a",
                target={"stays": to_value(stays)},
            )
        ]
    )
    (recipient,) = recipients_from_proto(batch)
    body = "{% for s in target.stays %}{{ s.hotel }}: {{ s.nights }}; {% endfor %}({{ target.stays | length }})"
    template = Template("stays", "email", "email", {"subject": "Your stays", "text_body": body})

    rendered = compile_template(template).render({"profile": {}, "target": dict(recipient.target)})

    assert rendered["text_body"] == "Ritz: 2; Savoy: 5; (2)"
