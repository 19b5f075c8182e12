"""The SMS worker and PreviewMessage over the real DeliveryService, with a real profile_stub and a local
HTTP server standing in for the Twilio-style API. Every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import csv
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from carillon.delivery.v1 import delivery_service_pb2 as dpb
from carillon.delivery.v1 import template_pb2
from carillon.profile.v1 import profile_pb2, profile_service_pb2
from carillon.type.v1 import channel_pb2, value_pb2
from tests.integration import test_delivery_server as server_tests
from tests.integration.test_delivery_server import METADATA, Stack, StartStack, seed
from tests.rpc_errors import failure_of
from tests.unit.test_delivery_sms import HttpRecorder
from tests.unit.test_delivery_sms import http_server as http_server  # the fixture

serving = server_tests.start_stack  # the fixture, under a name of this module

SMS_HEADER = dpb.SendHeader(
    campaign="campaigns/storm",
    run="campaigns/storm/runs/r1",
    activity="sms1",
    channel=channel_pb2.CHANNEL_SMS,
    category=channel_pb2.MESSAGE_CATEGORY_TRANSACTIONAL,
    template="templates/storm",
)


async def send(stack: Stack, header: dpb.SendHeader, batch: dpb.RecipientBatch) -> dpb.SendResponse:
    async def stream() -> AsyncIterator[dpb.SendRequest]:
        yield dpb.SendRequest(header=header)
        yield dpb.SendRequest(batch=batch)

    (ack,) = [a async for a in stack.delivery.Send(stream(), metadata=METADATA)]
    return ack


async def test_an_sms_worker_texts_each_recipient_personalised_through_the_http_api(
    serving: StartStack, http_server: HttpRecorder
) -> None:
    stack = await serving(
        channel="sms", sms_api_url=f"http://127.0.0.1:{http_server.port}", sms_account="AC1", sms_sender="Carillon"
    )
    await stack.profiles.UpsertProfiles(
        profile_service_pb2.UpsertProfilesRequest(
            profiles=[
                profile_pb2.Profile(
                    name=f"profiles/{pid}",
                    first_name=name,
                    identities=[value_pb2.Identity(namespace="phone", value=phone)],
                )
                for pid, name, phone in (("ada", "Ada", "+46700000001"), ("bo", "Bo", "+46700000002"))
            ]
        ),
        metadata=METADATA,
    )
    await stack.delivery.CreateTemplate(
        dpb.CreateTemplateRequest(
            template_id="storm",
            template=template_pb2.Template(
                channel=channel_pb2.CHANNEL_SMS,
                sms=template_pb2.SmsContent(text="{{ profile.first_name }}: storm warning in {{ target.city }}."),
            ),
        ),
        metadata=METADATA,
    )
    batch = dpb.RecipientBatch(
        sequence=1,
        recipients=[
            dpb.Recipient(
                identity=value_pb2.Identity(namespace="phone", value=phone),
                target={"city": value_pb2.Value(string_value="Miami")},
            )
            for phone in ("+46700000001", "+46700000002")
        ],
    )

    ack = await send(stack, SMS_HEADER, batch)
    replay = await send(stack, SMS_HEADER, batch)

    assert (ack.sent, replay.sent, replay.already_sent) == (2, 0, 2)
    assert sorted((r.form["To"], r.form["Body"], r.form["From"]) for r in http_server.requests) == [
        ("+46700000001", "Ada: storm warning in Miami.", "Carillon"),
        ("+46700000002", "Bo: storm warning in Miami.", "Carillon"),
    ]
    assert len({r.headers["idempotency-key"] for r in http_server.requests}) == 2


async def test_an_sms_template_without_text_is_invalid(serving: StartStack) -> None:
    stack = await serving(channel="sms")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.delivery.CreateTemplate(
            dpb.CreateTemplateRequest(
                template_id="empty",
                template=template_pb2.Template(channel=channel_pb2.CHANNEL_SMS, sms=template_pb2.SmsContent()),
            ),
            metadata=METADATA,
        )

    assert failure_of(caught.value).fields == ["template.sms.text"]


async def test_preview_renders_a_template_for_a_profile_and_a_row(serving: StartStack) -> None:
    stack = await serving()
    await seed(stack)

    response = await stack.delivery.PreviewMessage(
        dpb.PreviewMessageRequest(
            template="templates/welcome",
            profile="profiles/ada",
            target={"hotel": value_pb2.Value(string_value="Ritz")},
        ),
        metadata=METADATA,
    )

    assert response.parts["subject"] == "Welcome Ada"
    assert response.parts["text_body"] == "Hello Ada, see you at Ritz."
    assert response.sms_segments == 0


async def test_preview_of_an_sms_template_counts_its_segments(serving: StartStack) -> None:
    stack = await serving(channel="sms")
    await stack.delivery.CreateTemplate(
        dpb.CreateTemplateRequest(
            template_id="long",
            template=template_pb2.Template(
                channel=channel_pb2.CHANNEL_SMS, sms=template_pb2.SmsContent(text="Zażółć {{ target.n * 'x' }}")
            ),
        ),
        metadata=METADATA,
    )

    response = await stack.delivery.PreviewMessage(
        dpb.PreviewMessageRequest(template="templates/long", target={"n": value_pb2.Value(integer_value=100)}),
        metadata=METADATA,
    )

    assert (response.sms_encoding, response.sms_segments) == ("UCS-2", 2)


async def test_preview_with_a_row_missing_a_variable_is_invalid_and_names_the_target(serving: StartStack) -> None:
    stack = await serving()
    await seed(stack)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.delivery.PreviewMessage(
            dpb.PreviewMessageRequest(template="templates/welcome", profile="profiles/ada"), metadata=METADATA
        )

    failure = failure_of(caught.value)
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "RENDER_ERROR",
        ["target"],
    )


async def test_preview_for_an_unknown_profile_is_not_found(serving: StartStack) -> None:
    stack = await serving()
    await seed(stack)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.delivery.PreviewMessage(
            dpb.PreviewMessageRequest(template="templates/welcome", profile="profiles/nobody"), metadata=METADATA
        )

    assert failure_of(caught.value).code == grpc.StatusCode.NOT_FOUND


async def test_a_push_worker_notifies_each_device_through_the_fcm_style_api(
    serving: StartStack, http_server: HttpRecorder
) -> None:
    stack = await serving(channel="push", push_api_url=f"http://127.0.0.1:{http_server.port}", push_project="p1")
    await stack.profiles.UpsertProfiles(
        profile_service_pb2.UpsertProfilesRequest(
            profiles=[
                profile_pb2.Profile(
                    name="profiles/ada",
                    first_name="Ada",
                    identities=[value_pb2.Identity(namespace="push_token", value="tok-ada")],
                )
            ]
        ),
        metadata=METADATA,
    )
    await stack.delivery.CreateTemplate(
        dpb.CreateTemplateRequest(
            template_id="storm",
            template=template_pb2.Template(
                channel=channel_pb2.CHANNEL_PUSH,
                push=template_pb2.PushContent(
                    title="Storm", body="Stay inside, {{ profile.first_name }}", deep_link="app://storm"
                ),
            ),
        ),
        metadata=METADATA,
    )
    header = dpb.SendHeader()
    header.CopyFrom(SMS_HEADER)
    header.channel = channel_pb2.CHANNEL_PUSH
    batch = dpb.RecipientBatch(
        sequence=1, recipients=[dpb.Recipient(identity=value_pb2.Identity(namespace="push_token", value="tok-ada"))]
    )

    ack = await send(stack, header, batch)

    assert ack.sent == 1
    (request,) = http_server.requests
    message = json.loads(request.body)["message"]
    assert (message["token"], message["notification"]["body"]) == ("tok-ada", "Stay inside, Ada")
    assert message["data"]["deep_link"] == "app://storm"


async def test_a_direct_mail_worker_writes_the_recipients_into_an_extract_file(
    serving: StartStack, tmp_path: Path
) -> None:
    extracts = tmp_path / "extracts"
    stack = await serving(channel="direct_mail", extract_dir=extracts, extract_sort_column="name")
    await stack.profiles.UpsertProfiles(
        profile_service_pb2.UpsertProfilesRequest(
            profiles=[
                profile_pb2.Profile(
                    name=f"profiles/{pid}",
                    first_name=name,
                    identities=[value_pb2.Identity(namespace="postal_address", value=postal)],
                )
                for pid, name, postal in (("zed", "Zed", "1 Rue X, Paris"), ("ada", "Ada", "2 Main St, Oslo"))
            ]
        ),
        metadata=METADATA,
    )
    await stack.delivery.CreateTemplate(
        dpb.CreateTemplateRequest(
            template_id="catalogue",
            template=template_pb2.Template(
                channel=channel_pb2.CHANNEL_DIRECT_MAIL,
                direct_mail=template_pb2.DirectMailContent(
                    columns=[
                        template_pb2.DirectMailColumn(header="name", value="{{ profile.first_name }}"),
                        template_pb2.DirectMailColumn(header="address", value="{{ profile.address }}"),
                        template_pb2.DirectMailColumn(header="offer", value="{{ target.offer }}"),
                    ]
                ),
            ),
        ),
        metadata=METADATA,
    )
    header = dpb.SendHeader()
    header.CopyFrom(SMS_HEADER)
    header.channel = channel_pb2.CHANNEL_DIRECT_MAIL
    header.template = "templates/catalogue"
    batch = dpb.RecipientBatch(
        sequence=1,
        recipients=[
            dpb.Recipient(
                identity=value_pb2.Identity(namespace="postal_address", value=postal),
                target={"offer": value_pb2.Value(string_value="10%")},
            )
            for postal in ("1 Rue X, Paris", "2 Main St, Oslo")
        ],
    )

    ack = await send(stack, header, batch)
    replay = await send(stack, header, batch)

    assert (ack.sent, replay.already_sent) == (2, 2)
    (path,) = extracts.glob("extract_*.csv")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["message_id", "name", "address", "offer"]
    assert [r[1:] for r in rows[1:]] == [["Ada", "2 Main St, Oslo", "10%"], ["Zed", "1 Rue X, Paris", "10%"]]
