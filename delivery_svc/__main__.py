"""``python -m delivery_svc --channel email``: serve the DeliveryService for one channel.

A batch allocates several objects per recipient by the thousand (verdicts, rendered messages, ledger
rows), nearly all freed by reference counting; with the interpreter's default thresholds the cyclic
garbage collector would scan the young objects of the batches in flight again and again. The server
process therefore freezes what it imported (never scanned again) and collects less often (worker CPU
per message in bench/delivery.py: 64-71 -> 50-53 us). The oldest generation is still collected every
ten million or so allocations (a few hundred thousand messages), so that cyclic garbage cannot pile up
in a long-lived worker. A process that imports delivery_svc (the tests) keeps the defaults, as
profile_stub does.
"""

from __future__ import annotations

import argparse
import gc
import sys

from carillon_chassis.entrypoint import run_service
from carillon_chassis.server import GrpcServer
from delivery_svc.app import ChannelNotImplemented, build_server
from delivery_svc.settings import DeliverySettings

CHANNEL_CHOICES = ("email", "sms", "push", "direct_mail")
GC_THRESHOLDS = (50_000, 20, 10)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--channel", choices=CHANNEL_CHOICES, help="the channel this worker serves (default email)")
    parser.add_argument("--profile-target", help="host:port of the ProfileService")
    parser.add_argument("--email-provider", choices=("outbox", "smtp"), help="where emails go")


async def _build(settings: DeliverySettings) -> GrpcServer:
    try:
        return await build_server(settings)
    except ChannelNotImplemented as exc:
        raise SystemExit(f"delivery_svc: {exc}") from None


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and serve until SIGTERM or SIGINT."""
    run_service(
        DeliverySettings,
        _build,
        "Carillon delivery_svc: a delivery worker for one channel.",
        argv,
        extend=_arguments,
        extra=("channel", "profile_target", "email_provider"),
    )


if __name__ == "__main__":
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    main(sys.argv[1:])
