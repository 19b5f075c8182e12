"""SMS messages: segment counting (GSM-7 / UCS-2) and the Twilio-style HTTP API provider.

A text made only of GSM 03.38 characters is sent as GSM-7: 160 septets in one segment, 153 per
segment when concatenated, the extension characters (``^{}\\[~]|€`` and form feed) taking two septets.
Any other character makes the whole text UCS-2: 70 UTF-16 code units in one segment, 67 per segment
when concatenated.

:class:`TwilioSmsProvider` POSTs ``To``, ``From`` and ``Body`` form-encoded to
``{base_url}/2010-04-01/Accounts/{account}/Messages.json`` with basic authentication and the message
id as ``Idempotency-Key``, over urllib on the provider's worker thread. A 2xx reply is sent; 429 and
5xx replies are transient; a connection failure makes the provider unavailable; any other reply is
permanent.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from delivery_svc.providers import PermanentProviderError, ProviderUnavailableError, TransientProviderError

_GSM_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM_EXTENSION = frozenset("^{}\\[~]|€\f")
MAX_SEGMENTS = 10


@dataclass(frozen=True)
class Segments:
    """How a text travels: its encoding ("GSM-7" or "UCS-2"), its length in units and its segments."""

    encoding: str
    units: int
    count: int


def count_segments(text: str) -> Segments:
    """The encoding and number of segments of ``text``."""
    if all(c in _GSM_BASIC or c in _GSM_EXTENSION for c in text):
        units = sum(2 if c in _GSM_EXTENSION else 1 for c in text)
        single, multi, encoding = 160, 153, "GSM-7"
    else:
        units = len(text.encode("utf-16-le")) // 2
        single, multi, encoding = 70, 67, "UCS-2"
    if units <= single:
        return Segments(encoding, units, 1 if units else 0)
    return Segments(encoding, units, -(-units // multi))


@dataclass(frozen=True)
class OutgoingSms:
    """One text message ready for a provider."""

    message_id: str
    sender: str
    recipient: str
    body: str
    segments: int


@dataclass(frozen=True)
class TwilioConfig:
    """Where and as whom to call the Twilio-style API."""

    base_url: str
    account: str
    token: str
    timeout_s: float = 30.0


class TwilioSmsProvider:
    """Sends texts through a Twilio-style HTTP API."""

    def __init__(self, config: TwilioConfig) -> None:
        self.config = config

    def open(self) -> TwilioSmsProvider:
        """The provider is its own session (each message is one HTTP request)."""
        return self

    def send(self, message: OutgoingSms) -> None:
        """POST one message; classify the reply."""
        config = self.config
        url = f"{config.base_url.rstrip('/')}/2010-04-01/Accounts/{urllib.parse.quote(config.account)}/Messages.json"
        data = urllib.parse.urlencode({"To": message.recipient, "From": message.sender, "Body": message.body})
        credentials = base64.b64encode(f"{config.account}:{config.token}".encode()).decode()
        request = urllib.request.Request(
            url,
            data=data.encode(),
            method="POST",
            headers={
                "Authorization": f"Basic {credentials}",
                "Content-Type": "application/x-www-form-urlencoded",
                "Idempotency-Key": message.message_id,
            },
        )
        post(request, config.timeout_s)

    def close(self) -> None:
        """Nothing to release."""


def post(request: urllib.request.Request, timeout_s: float) -> bytes:
    """Send an HTTP request and return the body of a 2xx reply; raise a classified ProviderError."""
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body: bytes = response.read()
            return body
    except urllib.error.HTTPError as exc:
        detail = _detail(exc)
        if exc.code == 429 or exc.code >= 500:
            raise TransientProviderError(f"HTTP {exc.code}: {detail}") from exc
        raise PermanentProviderError(f"HTTP {exc.code}: {detail}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise ProviderUnavailableError(f"{request.full_url}: {exc}") from exc


def _detail(exc: urllib.error.HTTPError) -> str:
    try:
        raw = exc.read()[:500]
        parsed = json.loads(raw)
        return str(parsed.get("message", raw.decode(errors="replace"))) if isinstance(parsed, dict) else str(parsed)
    except (ValueError, OSError):
        return exc.reason if isinstance(exc.reason, str) else str(exc.reason)
