"""Outbound gRPC channels to the other services, with sandbox metadata and retries.

Channels use a service config that retries ``UNAVAILABLE`` with exponential backoff, so a peer
restarting for a moment does not fail a run; the callers' own operations are idempotent.
"""

from __future__ import annotations

import json

import grpc

from carillon_chassis.sandbox import sandbox_metadata

_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],
                "waitForReady": True,
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

CHANNEL_OPTIONS: tuple[tuple[str, object], ...] = (
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)


def open_channel(target: str) -> grpc.aio.Channel:
    """An insecure asyncio channel to ``host:port`` with the retry service config."""
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


def call_metadata(sandbox: str) -> tuple[tuple[str, str], ...]:
    """Metadata for an outbound call acting in ``sandbox``."""
    return sandbox_metadata(sandbox)
