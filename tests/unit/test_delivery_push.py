"""The FCM-v1-style and APNs-style push adapters against a local recording HTTP server."""

from __future__ import annotations

import json

import pytest

from delivery_svc.providers import PermanentProviderError, TransientProviderError
from delivery_svc.push import ApnsProvider, FcmProvider, OutgoingPush, PushConfig, apns_id
from tests.unit.test_delivery_sms import HttpRecorder
from tests.unit.test_delivery_sms import http_server as http_server  # the fixture

PUSH = OutgoingPush("m42", "device-token-1", "Storm", "Stay inside, Ada", "app://alerts/42")


def config(port: int) -> PushConfig:
    return PushConfig(f"http://127.0.0.1:{port}", "tok", project="proj-1", topic="com.example.app", timeout_s=10)


def test_fcm_posts_the_notification_to_the_projects_send_endpoint(http_server: HttpRecorder) -> None:
    FcmProvider(config(http_server.port)).send(PUSH)

    (request,) = http_server.requests
    assert request.path == "/v1/projects/proj-1/messages:send"
    assert request.headers["authorization"] == "Bearer tok"
    assert json.loads(request.body) == {
        "message": {
            "token": "device-token-1",
            "notification": {"title": "Storm", "body": "Stay inside, Ada"},
            "data": {"carillon_message_id": "m42", "deep_link": "app://alerts/42"},
        }
    }


def test_apns_posts_to_the_device_with_a_stable_apns_id(http_server: HttpRecorder) -> None:
    provider = ApnsProvider(config(http_server.port))

    provider.send(PUSH)
    provider.send(PUSH)

    first, second = http_server.requests
    assert first.path == "/3/device/device-token-1"
    assert first.headers["apns-topic"] == "com.example.app"
    assert first.headers["apns-push-type"] == "alert"
    assert first.headers["apns-id"] == second.headers["apns-id"] == apns_id("m42")
    assert json.loads(first.body) == {
        "aps": {"alert": {"title": "Storm", "body": "Stay inside, Ada"}},
        "carillon_message_id": "m42",
        "deep_link": "app://alerts/42",
    }


@pytest.mark.parametrize("adapter", [FcmProvider, ApnsProvider])
def test_push_replies_are_classified_like_other_http_providers(
    http_server: HttpRecorder, adapter: type[FcmProvider] | type[ApnsProvider]
) -> None:
    http_server.statuses += [503, 410]
    provider = adapter(config(http_server.port))

    with pytest.raises(TransientProviderError):
        provider.send(PUSH)
    with pytest.raises(PermanentProviderError):
        provider.send(PUSH)


DATA_PUSH = OutgoingPush(
    "m43", "device-token-2", "Storm", "Stay inside", "app://alerts/43", {"booking": "B-7", "city": "Miami"}
)


def test_fcm_sends_the_custom_data_next_to_the_message_id_and_deep_link(http_server: HttpRecorder) -> None:
    FcmProvider(config(http_server.port)).send(DATA_PUSH)

    (request,) = http_server.requests
    assert json.loads(request.body)["message"]["data"] == {
        "booking": "B-7",
        "city": "Miami",
        "carillon_message_id": "m43",
        "deep_link": "app://alerts/43",
    }


def test_apns_sends_the_custom_data_as_top_level_payload_keys(http_server: HttpRecorder) -> None:
    ApnsProvider(config(http_server.port)).send(DATA_PUSH)

    (request,) = http_server.requests
    assert json.loads(request.body) == {
        "aps": {"alert": {"title": "Storm", "body": "Stay inside"}},
        "booking": "B-7",
        "city": "Miami",
        "carillon_message_id": "m43",
        "deep_link": "app://alerts/43",
    }
