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


async def _push_stack(serving: StartStack, http_server: HttpRecorder, provider: str) -> Stack:
    """A push worker of ``provider`` style, profiles ada and bo with device tokens, and the template
    "storm" with custom data rendered from the profile and the working-set row."""
    stack = await serving(
        channel="push",
        push_provider=provider,
        push_api_url=f"http://127.0.0.1:{http_server.port}",
        push_project="p1",
        push_topic="com.example.app",
    )
    await stack.profiles.UpsertProfiles(
        profile_service_pb2.UpsertProfilesRequest(
            profiles=[
                profile_pb2.Profile(
                    name=f"profiles/{pid}",
                    first_name=pid.title(),
                    identities=[value_pb2.Identity(namespace="push_token", value=f"tok-{pid}")],
                )
                for pid in ("ada", "bo")
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
                    title="Storm",
                    body="Stay inside, {{ profile.first_name }}",
                    deep_link="app://bookings/{{ target.booking }}",
                    data={"booking": "{{ target.booking }}", "greeting": "Hi {{ profile.first_name }}"},
                ),
            ),
        ),
        metadata=METADATA,
    )
    return stack


def _push_batch() -> tuple[dpb.SendHeader, dpb.RecipientBatch]:
    header = dpb.SendHeader()
    header.CopyFrom(SMS_HEADER)
    header.channel = channel_pb2.CHANNEL_PUSH
    batch = dpb.RecipientBatch(
        sequence=1,
        recipients=[
            dpb.Recipient(
                identity=value_pb2.Identity(namespace="push_token", value=f"tok-{pid}"),
                entity_key=booking,
                target={"booking": value_pb2.Value(string_value=booking)},
            )
            for pid, booking in (("ada", "B-1"), ("bo", "B-2"))
        ],
    )
    return header, batch


async def test_a_push_templates_data_is_rendered_per_recipient_and_sent_in_the_fcm_data(
    serving: StartStack, http_server: HttpRecorder
) -> None:
    stack = await _push_stack(serving, http_server, "fcm")

    ack = await send(stack, *_push_batch())

    assert ack.sent == 2
    data = {json.loads(r.body)["message"]["token"]: json.loads(r.body)["message"]["data"] for r in http_server.requests}
    assert {token: {k: v for k, v in d.items() if k != "carillon_message_id"} for token, d in data.items()} == {
        "tok-ada": {"booking": "B-1", "greeting": "Hi Ada", "deep_link": "app://bookings/B-1"},
        "tok-bo": {"booking": "B-2", "greeting": "Hi Bo", "deep_link": "app://bookings/B-2"},
    }


async def test_a_push_templates_data_is_sent_as_apns_payload_keys(
    serving: StartStack, http_server: HttpRecorder
) -> None:
    stack = await _push_stack(serving, http_server, "apns")

    ack = await send(stack, *_push_batch())

    assert ack.sent == 2
    payloads = {r.path: json.loads(r.body) for r in http_server.requests}
    assert {path: (p["booking"], p["greeting"]) for path, p in payloads.items()} == {
        "/3/device/tok-ada": ("B-1", "Hi Ada"),
        "/3/device/tok-bo": ("B-2", "Hi Bo"),
    }


async def test_a_push_template_reads_back_with_its_data(serving: StartStack, http_server: HttpRecorder) -> None:
    stack = await _push_stack(serving, http_server, "fcm")

    got = await stack.delivery.GetTemplate(dpb.GetTemplateRequest(name="templates/storm"), metadata=METADATA)

    assert dict(got.template.push.data) == {
        "booking": "{{ target.booking }}",
        "greeting": "Hi {{ profile.first_name }}",
    }
    assert got.template.push.deep_link == "app://bookings/{{ target.booking }}"


async def test_a_push_template_with_a_reserved_data_key_is_invalid_and_creates_nothing(serving: StartStack) -> None:
    stack = await serving(channel="push")
    request = dpb.CreateTemplateRequest(
        template_id="bad",
        template=template_pb2.Template(
            channel=channel_pb2.CHANNEL_PUSH,
            push=template_pb2.PushContent(body="hi", data={"carillon_message_id": "x", "ok": "y"}),
        ),
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.delivery.CreateTemplate(request, metadata=METADATA)

    failure = failure_of(caught.value)
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_TEMPLATE",
        ["template.push.data"],
    )
    listed = await stack.delivery.ListTemplates(dpb.ListTemplatesRequest(), metadata=METADATA)
    assert list(listed.templates) == []


async def test_a_direct_mail_activity_sent_in_several_batches_fills_files_of_max_rows_each(
    serving: StartStack, tmp_path: Path
) -> None:
    extracts = tmp_path / "extracts"
    stack = await serving(channel="direct_mail", extract_dir=extracts, extract_max_rows=5)
    people = [f"p{i:02d}" for i in range(12)]
    await stack.profiles.UpsertProfiles(
        profile_service_pb2.UpsertProfilesRequest(
            profiles=[
                profile_pb2.Profile(
                    name=f"profiles/{pid}",
                    first_name=pid.upper(),
                    identities=[value_pb2.Identity(namespace="postal_address", value=f"{pid} Main St")],
                )
                for pid in people
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
                    columns=[template_pb2.DirectMailColumn(header="name", value="{{ profile.first_name }}")]
                ),
            ),
        ),
        metadata=METADATA,
    )
    header = dpb.SendHeader()
    header.CopyFrom(SMS_HEADER)
    header.channel = channel_pb2.CHANNEL_DIRECT_MAIL
    header.template = "templates/catalogue"
    batches = [
        dpb.RecipientBatch(
            sequence=n + 1,
            recipients=[
                dpb.Recipient(identity=value_pb2.Identity(namespace="postal_address", value=f"{pid} Main St"))
                for pid in people[start : start + 4]
            ],
        )
        for n, start in enumerate(range(0, len(people), 4))
    ]

    async def stream() -> AsyncIterator[dpb.SendRequest]:
        yield dpb.SendRequest(header=header)
        for batch in batches:
            yield dpb.SendRequest(batch=batch)

    acks = [a async for a in stack.delivery.Send(stream(), metadata=METADATA)]

    assert [a.sent for a in acks] == [4, 4, 4]
    files = sorted(extracts.glob("extract_*.csv"), key=lambda f: f.stem.rsplit("_", 1)[1])
    contents = []
    for path in files:
        with path.open(newline="", encoding="utf-8") as handle:
            contents.append(list(csv.reader(handle)))
    assert [len(rows) - 1 for rows in contents] == [5, 5, 2]
    assert all(rows[0] == ["message_id", "name"] for rows in contents)
    assert [r[1] for rows in contents for r in rows[1:]] == [p.upper() for p in people]
