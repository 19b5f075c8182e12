"""The common ``python -m <service>`` entry point: arguments, logging and the serve loop."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from carillon_chassis.logging import configure_logging
from carillon_chassis.server import GrpcServer
from carillon_chassis.settings import ServiceSettings

S = TypeVar("S", bound=ServiceSettings)


def common_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every service takes (they override the environment)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on; 0 picks a free one")
    parser.add_argument("--port-file", type=Path, help="write the bound port to this file once serving")
    parser.add_argument("--database-url", help="sqlite:///FILE or postgresql+psycopg://... URL")
    return parser


def overrides(args: argparse.Namespace, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Settings overrides from the parsed arguments that were given."""
    names = ["host", "port", "port_file", "database_url", *extra]
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def run_service(
    settings_cls: type[S],
    build: Callable[[S], Awaitable[GrpcServer]],
    description: str,
    argv: Sequence[str] | None = None,
    *,
    extend: Callable[[argparse.ArgumentParser], None] | None = None,
    extra: Sequence[str] = (),
) -> None:
    """Parse arguments, configure logging, build the server and serve until SIGTERM or SIGINT."""
    parser = common_parser(description)
    if extend is not None:
        extend(parser)
    args = parser.parse_args(argv)
    settings = settings_cls(**overrides(args, extra))
    configure_logging(settings.log_format, settings.log_level)

    async def _main() -> None:
        server = await build(settings)
        await server.serve_until_signal()

    asyncio.run(_main())
