"""The RecordMessageLogs requests of the message log flusher: a batch's shared fields travel once, as
``defaults``, and audience_svc reads back exactly the logs a request of complete logs would give."""

from __future__ import annotations

import datetime as dt

from audience_svc.servicer import message_log_from_proto
from delivery_svc.message_logs import MessageLog, to_proto, to_request

SENT = dt.datetime(2026, 11, 29, 10, tzinfo=dt.UTC)


def log(i: int, status: str = "sent", activity: str = "email1", when: dt.datetime = SENT) -> MessageLog:
    return MessageLog(
        message_id=f"m{i}",
        status=status,
        campaign="campaigns/c",
        run="campaigns/c/runs/r",
        activity=activity,
        channel="email",
        identity_namespace="email",
        identity_value=f"u{i}@x.io",
        profile_id=f"p{i}" if i % 2 else "",
        entity_key=f"k{i}",
        event_time=when,
    )


def read_back(logs: list[MessageLog]) -> list[object]:
    request = to_request(logs)
    return [message_log_from_proto(m, f"logs[{i}]", request.defaults) for i, m in enumerate(request.logs)]


def test_the_logs_of_a_batch_share_their_fields_through_the_defaults() -> None:
    logs = [log(i) for i in range(3)]

    request = to_request(logs)

    assert request.HasField("defaults") and request.defaults.campaign == "campaigns/c"
    assert [(m.message_id, m.campaign, m.HasField("event_time")) for m in request.logs] == [
        ("m0", "", False),
        ("m1", "", False),
        ("m2", "", False),
    ]
    complete = [message_log_from_proto(to_proto(entry)) for entry in logs]
    assert read_back(logs) == complete


def test_logs_of_several_statuses_or_activities_are_sent_complete() -> None:
    logs = [log(0), log(1, status="opened"), log(2, activity="email2"), log(3, when=SENT + dt.timedelta(seconds=1))]

    request = to_request(logs)

    assert not request.HasField("defaults")
    assert list(request.logs) == [to_proto(entry) for entry in logs]
    assert read_back(logs) == [message_log_from_proto(to_proto(entry)) for entry in logs]
