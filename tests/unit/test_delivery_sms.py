"""SMS segment counting and the Twilio-style HTTP adapter against a local recording HTTP server."""

from __future__ import annotations

import base64
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from delivery_svc.providers import (
    PermanentProviderError,
    ProviderUnavailableError,
    TransientProviderError,
)
from delivery_svc.sms import OutgoingSms, Segments, TwilioConfig, TwilioSmsProvider, count_segments
from tests.e2e.conftest import free_port


def test_a_gsm_text_of_160_characters_is_one_segment_and_161_are_two() -> None:
    assert count_segments("a" * 160) == Segments("GSM-7", 160, 1)
    assert (count_segments("a" * 161).encoding, count_segments("a" * 161).count) == ("GSM-7", 2)
    assert count_segments("a" * 306).count == 2
    assert count_segments("a" * 307).count == 3


def test_gsm_extension_characters_take_two_septets() -> None:
    segments = count_segments("€" * 80)

    assert (segments.encoding, segments.units, segments.count) == ("GSM-7", 160, 1)
    assert count_segments("€" * 80 + "a").count == 2


def test_one_character_outside_gsm_makes_the_text_ucs2() -> None:
    assert (count_segments("ł" + "a" * 69).encoding, count_segments("ł" + "a" * 69).count) == ("UCS-2", 1)
    assert count_segments("ł" + "a" * 70).count == 2
    assert count_segments("ł" + "a" * 133).count == 2
    assert count_segments("ł" + "a" * 134).count == 3


def test_an_emoji_counts_as_two_ucs2_units() -> None:
    assert count_segments("😀" * 35).units == 70
    assert count_segments("😀" * 35).count == 1


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    form: dict[str, str]
    body: str


@dataclass
class HttpRecorder:
    """A local HTTP server recording requests and answering with queued status codes (201 by default)."""

    port: int
    requests: list[Recorded] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)


@pytest.fixture
def http_server() -> Iterator[HttpRecorder]:
    recorder = HttpRecorder(port=0)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length).decode()
            form = dict(urllib.parse.parse_qsl(body))
            recorder.requests.append(Recorded(self.path, {k.lower(): v for k, v in self.headers.items()}, form, body))
            status = recorder.statuses.pop(0) if recorder.statuses else 201
            payload = b'{"sid": "SM1", "status": "queued"}' if status < 300 else b'{"message": "refused"}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    recorder.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield recorder
    server.shutdown()
    server.server_close()


def provider(port: int) -> TwilioSmsProvider:
    return TwilioSmsProvider(TwilioConfig(f"http://127.0.0.1:{port}", "AC123", "secret", timeout_s=10))


SMS = OutgoingSms("m0123", "Carillon", "+46701234567", "Hej Ada", 1)


def test_the_adapter_posts_the_message_form_encoded_with_basic_auth_and_the_idempotency_key(
    http_server: HttpRecorder,
) -> None:
    provider(http_server.port).send(SMS)

    (request,) = http_server.requests
    assert request.path == "/2010-04-01/Accounts/AC123/Messages.json"
    assert request.form == {"To": "+46701234567", "From": "Carillon", "Body": "Hej Ada"}
    assert request.headers["authorization"] == "Basic " + base64.b64encode(b"AC123:secret").decode()
    assert request.headers["idempotency-key"] == "m0123"


@pytest.mark.parametrize(
    ("status", "error"),
    [(429, TransientProviderError), (503, TransientProviderError), (400, PermanentProviderError)],
)
def test_an_error_reply_is_classified_by_its_status(
    http_server: HttpRecorder, status: int, error: type[Exception]
) -> None:
    http_server.statuses.append(status)

    with pytest.raises(error) as caught:
        provider(http_server.port).send(SMS)

    assert not isinstance(caught.value, ProviderUnavailableError)


def test_an_api_that_cannot_be_reached_makes_the_provider_unavailable() -> None:
    with pytest.raises(ProviderUnavailableError):
        provider(free_port()).send(SMS)
