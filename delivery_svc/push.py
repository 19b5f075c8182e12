"""Push notifications: FCM-v1-style and APNs-style HTTP adapters.

Both send one JSON request per message over urllib on the provider's worker thread, and classify
replies like the SMS adapter (2xx sent; 429 and 5xx transient; connection failure unavailable; other
replies permanent).

- :class:`FcmProvider` POSTs ``{"message": {"token", "notification": {"title", "body"}, "data"}}`` to
  ``{base_url}/v1/projects/{project}/messages:send`` with a bearer token.
- :class:`ApnsProvider` POSTs ``{"aps": {"alert": {"title", "body"}}, ...}`` to
  ``{base_url}/3/device/{token}`` with ``apns-topic``, ``apns-push-type: alert`` and ``apns-id`` (a
  UUID derived from the message id, so a resend carries the same id). The real APNs speaks only
  HTTP/2, which urllib does not: this adapter talks HTTP/1.1 to an APNs-style endpoint or gateway.

Both put the message id in the payload (``carillon_message_id``), the deep link and the template's
rendered custom data (FCM: in ``data``; APNs: top-level keys next to ``aps``); the template refuses
custom keys that would collide with these.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from delivery_svc.sms import post


@dataclass(frozen=True)
class OutgoingPush:
    """One push notification ready for a provider."""

    message_id: str
    recipient: str  # the device token
    title: str
    body: str
    deep_link: str = ""
    data: Mapping[str, str] = field(default_factory=dict)  # custom data, rendered per recipient


@dataclass(frozen=True)
class PushConfig:
    """Where and with which credentials to call the push API."""

    base_url: str
    token: str
    project: str = ""  # FCM project id
    topic: str = ""  # APNs topic (the app's bundle id)
    timeout_s: float = 30.0


def apns_id(message_id: str) -> str:
    """A UUID that is stable for a message id."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"carillon:{message_id}"))


class FcmProvider:
    """FCM-v1-style HTTP API."""

    def __init__(self, config: PushConfig) -> None:
        self.config = config

    def open(self) -> FcmProvider:
        """The provider is its own session."""
        return self

    def send(self, message: OutgoingPush) -> None:
        """POST one message."""
        config = self.config
        url = f"{config.base_url.rstrip('/')}/v1/projects/{urllib.parse.quote(config.project)}/messages:send"
        data = {**message.data, "carillon_message_id": message.message_id}
        if message.deep_link:
            data["deep_link"] = message.deep_link
        payload = {
            "message": {
                "token": message.recipient,
                "notification": {"title": message.title, "body": message.body},
                "data": data,
            }
        }
        request = urllib.request.Request(
            url,
            data=json.dumps(payload).encode(),
            method="POST",
            headers={"Authorization": f"Bearer {config.token}", "Content-Type": "application/json"},
        )
        post(request, config.timeout_s)

    def close(self) -> None:
        """Nothing to release."""


class ApnsProvider:
    """APNs-style HTTP API."""

    def __init__(self, config: PushConfig) -> None:
        self.config = config

    def open(self) -> ApnsProvider:
        """The provider is its own session."""
        return self

    def send(self, message: OutgoingPush) -> None:
        """POST one notification."""
        config = self.config
        url = f"{config.base_url.rstrip('/')}/3/device/{urllib.parse.quote(message.recipient)}"
        payload: dict[str, object] = {
            **message.data,
            "aps": {"alert": {"title": message.title, "body": message.body}},
            "carillon_message_id": message.message_id,
        }
        if message.deep_link:
            payload["deep_link"] = message.deep_link
        request = urllib.request.Request(
            url,
            data=json.dumps(payload).encode(),
            method="POST",
            headers={
                "authorization": f"bearer {config.token}",
                "apns-topic": config.topic,
                "apns-push-type": "alert",
                "apns-id": apns_id(message.message_id),
                "content-type": "application/json",
            },
        )
        post(request, config.timeout_s)

    def close(self) -> None:
        """Nothing to release."""
