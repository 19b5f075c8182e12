"""The ``carillon`` command: start the services, run the demo, and look at campaigns and runs.

    carillon up [--demo]           start the four services (and run the demo); Ctrl-C stops them
    carillon demo                  load the sample data and run the demo campaign on running services
    carillon ingest ENTITY FILE    load a CSV or JSON Lines file into an entity, with a progress bar
    carillon status                gRPC health of each service
    carillon campaigns list        campaigns of a sandbox
    carillon runs list CAMPAIGN    runs of a campaign, newest first
    carillon runs get RUN          one run with its per-activity counts
    carillon runs watch RUN        live progress bars of a run and its log until it ends

Every command takes ``--help``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from carillon.scheduler.v1 import run_pb2
from carillon.scheduler.v1 import scheduler_service_pb2 as sch
from carillon.scheduler.v1 import scheduler_service_pb2_grpc as sch_grpc
from carillon_chassis.clients import call_metadata
from carillon_cli.demo import Demo, DemoResult
from carillon_cli.endpoints import GRPC_SERVICES, SERVICES, Endpoints
from carillon_cli.runs_watch import add_watch_parser
from carillon_cli.supervisor import SMS_WORKER, StartupError, Supervisor, UpOptions, health_status

console = Console()


def _add_endpoint_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("service addresses (default: env CARILLON_<SERVICE>_TARGET or 127.0.0.1:5005x)")
    for service in SERVICES:
        group.add_argument(f"--{service}", metavar="HOST:PORT", help=f"address of the {service} service")


def _endpoints(args: argparse.Namespace) -> Endpoints:
    return Endpoints.from_env(**{service: getattr(args, service, None) for service in SERVICES})


def tasks_table(tasks: Sequence[run_pb2.ActivityTask], title: str = "per-activity counts") -> Table:
    """A table of a run's tasks and their counts (skips and failures one reason per line)."""
    table = Table(title=title)
    table.add_column("activity")
    table.add_column("state")
    for column in ("targeted", "sent", "already sent"):
        table.add_column(column, justify="right")
    table.add_column("skipped")
    table.add_column("failed")
    for task in tasks:
        skipped = "\n".join(f"{reason} {n}" for reason, n in sorted(task.skipped.items())) or "-"
        failed = "\n".join(f"{reason} {n}" for reason, n in sorted(task.failed.items())) or "-"
        table.add_row(
            task.activity,
            run_pb2.TaskState.Name(task.state).removeprefix("TASK_STATE_").lower(),
            str(task.targeted),
            str(task.sent),
            str(task.already_sent),
            skipped,
            failed,
        )
    return table


def task_notes(tasks: Sequence[run_pb2.ActivityTask]) -> list[str]:
    """One line per task that has a working set or a failure message."""
    notes = []
    for task in tasks:
        if task.message:
            notes.append(f"{task.activity}: {task.message}")
        elif task.working_set:
            notes.append(f"{task.activity}: working set {task.working_set}")
    return notes


def _run_demo(endpoints: Endpoints, sandbox: str, delivered_to: str) -> DemoResult:
    async def _go() -> DemoResult:
        demo = Demo(endpoints, sandbox=sandbox)
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress:
            bars: dict[str, TaskID] = {}

            def on_progress(run: run_pb2.Run) -> None:
                for task in run.tasks:
                    done = task.sent + task.already_sent + sum(task.skipped.values()) + sum(task.failed.values())
                    if task.activity not in bars:
                        bars[task.activity] = progress.add_task(task.activity, total=None)
                    finished = task.state in (run_pb2.TASK_STATE_SUCCEEDED, run_pb2.TASK_STATE_FAILED)
                    is_channel = bool(task.checkpoint or done)
                    total = task.targeted if is_channel or not finished else 1
                    progress.update(
                        bars[task.activity], total=max(total, 1), completed=done if is_channel else int(finished)
                    )

            try:
                return await demo.run(say=console.print, on_progress=on_progress)
            finally:
                await demo.close()

    result = asyncio.run(_go())
    console.print(tasks_table(result.tasks, title=f"{result.run}: {result.state}"))
    for note in task_notes(result.tasks):
        console.print(f"  {note}")
    if result.error:
        console.print(f"[red]run failed:[/red] {result.error}")
    sent = sum(t.sent for t in result.tasks)
    console.print(f"{sent} messages sent; {delivered_to}")
    return result


def cmd_up(args: argparse.Namespace) -> int:
    """Start the services, optionally run the demo, then serve until Ctrl-C."""
    options = UpOptions(
        data_dir=Path(args.data_dir),
        port_base=args.port_base,
        database_url=args.database_url,
        email_provider=args.email_provider,
        smtp_host=args.smtp_host,
        smtp_port=args.smtp_port,
        log_format=args.log_format,
        sms_api_url=args.sms_api_url,
    )
    supervisor = Supervisor(options)
    stop_requested = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    console.print(f"starting the four services (data in {options.data_dir.resolve()}, logs in {supervisor.log_dir})")
    try:
        endpoints = supervisor.start()
    except StartupError as err:
        console.print(f"[red]could not start:[/red] {err}")
        return 1
    for service in SERVICES:
        console.print(f"  {service:<9} {endpoints.of(service)}  SERVING")
    console.print(f"  {'sms':<9} {supervisor.address(SMS_WORKER)}  SERVING (delivery worker, --channel sms)")
    code = 0
    try:
        if args.demo:
            where = (
                f"emails written as .eml files to {options.outbox_dir}"
                if options.email_provider == "outbox"
                else f"emails sent to SMTP {options.smtp_host}:{options.smtp_port}"
            )
            result = _run_demo(endpoints, args.sandbox, where)
            code = 0 if result.state == "RUN_STATE_SUCCEEDED" else 1
        if args.exit_after_demo:
            return code
        console.print("serving; press Ctrl-C to stop")
        while not stop_requested:
            dead = supervisor.dead()
            if dead:
                console.print(f"[red]service exited unexpectedly:[/red] {', '.join(dead)} (see {supervisor.log_dir})")
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        console.print("stopping the services")
        supervisor.stop()
    return code


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo against services that are already running."""
    result = _run_demo(_endpoints(args), args.sandbox, "see the delivery worker's configuration for where")
    return 0 if result.state == "RUN_STATE_SUCCEEDED" else 1


def cmd_status(args: argparse.Namespace) -> int:
    """Print the health of each service; exit 1 unless all are SERVING."""
    endpoints = _endpoints(args)
    healthy = True
    for service in SERVICES:
        status = health_status(endpoints.of(service), GRPC_SERVICES[service])
        healthy &= status == "SERVING"
        console.print(f"{service:<9} {endpoints.of(service):<22} {status}")
    return 0 if healthy else 1


def _scheduler(args: argparse.Namespace) -> tuple[grpc.Channel, sch_grpc.CampaignServiceStub]:
    channel = grpc.insecure_channel(_endpoints(args).scheduler)
    return channel, sch_grpc.CampaignServiceStub(channel)


def cmd_campaigns_list(args: argparse.Namespace) -> int:
    """List campaigns, following pages."""
    channel, stub = _scheduler(args)
    with channel:
        table = Table("name", "display name", "state")
        token = ""
        while True:
            reply = stub.ListCampaigns(
                sch.ListCampaignsRequest(page_size=100, page_token=token), metadata=call_metadata(args.sandbox)
            )
            for campaign in reply.campaigns:
                table.add_row(campaign.name, campaign.display_name, campaign.state and _state(campaign.state))
            token = reply.next_page_token
            if not token:
                break
    console.print(table)
    return 0


def _state(value: int) -> str:
    from carillon.scheduler.v1 import campaign_pb2

    return str(campaign_pb2.CampaignState.Name(value)).removeprefix("CAMPAIGN_STATE_").lower()  # type: ignore[arg-type]


def cmd_runs_list(args: argparse.Namespace) -> int:
    """List the runs of a campaign."""
    channel, stub = _scheduler(args)
    with channel:
        reply = stub.ListRuns(
            sch.ListRunsRequest(parent=args.campaign, page_size=args.limit), metadata=call_metadata(args.sandbox)
        )
    table = Table("run", "state", "scheduled", "error")
    for run in reply.runs:
        table.add_row(
            run.name,
            run_pb2.RunState.Name(run.state).removeprefix("RUN_STATE_").lower(),
            run.scheduled_time.ToDatetime().isoformat() if run.HasField("scheduled_time") else "",
            run.error,
        )
    console.print(table)
    return 0


def cmd_runs_get(args: argparse.Namespace) -> int:
    """Show one run with its per-activity counts."""
    channel, stub = _scheduler(args)
    with channel:
        reply = stub.GetRun(sch.GetRunRequest(name=args.run), metadata=call_metadata(args.sandbox))
    console.print(tasks_table(reply.run.tasks, title=f"{reply.run.name}: {run_pb2.RunState.Name(reply.run.state)}"))
    for note in task_notes(reply.run.tasks):
        console.print(f"  {note}")
    if reply.run.error:
        console.print(f"error: {reply.run.error}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    """Load a CSV or JSON Lines file into an entity, with a progress bar."""
    from carillon_cli.ingest import ingest_file

    path = Path(args.file)
    if not path.is_file():
        console.print(f"[red]no such file:[/red] {path}")
        return 2
    with path.open("rb") as handle:
        total = max(sum(1 for line in handle if line.strip()) - (0 if path.suffix in (".jsonl", ".ndjson") else 1), 0)
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        bar = progress.add_task(f"ingest {path.name}", total=total or None)
        report = asyncio.run(
            ingest_file(
                _endpoints(args).audience,
                args.entity,
                path,
                fmt=args.format,
                batch_size=args.batch_size,
                sandbox=args.sandbox,
                on_progress=lambda n: progress.advance(bar, n),
            )
        )
    console.print(
        f"{report.batches} batches applied: {report.upserted} upserted, {report.deleted} deleted, "
        f"{report.ignored_stale} ignored (an equal or higher version was stored)"
    )
    for problem in report.problems:
        console.print(f"[red]refused[/red] {problem}")
    if report.problems:
        console.print("nothing of the refused batch was written; fix the lines above and run again")
    return 1 if report.problems else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``carillon`` command."""
    parser = argparse.ArgumentParser(
        prog="carillon",
        description="Carillon: campaign orchestration over gRPC. Start the services, run the demo, inspect runs.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser(
        "up",
        help="start the four services; Ctrl-C stops them",
        description="Start audience, profile, delivery (email) and scheduler as child "
        "processes on embedded SQLite (or --database-url), wait until each is SERVING, "
        "optionally run the demo, then serve until Ctrl-C.",
    )
    up.add_argument("--demo", action="store_true", help="run the demo campaign once everything is up")
    up.add_argument("--exit-after-demo", action="store_true", help="stop the services after the demo (for scripts)")
    up.add_argument("--data-dir", default="var", help="where SQLite files, logs and the outbox go (default ./var)")
    up.add_argument(
        "--port-base",
        type=int,
        default=50051,
        help="audience listens here, scheduler +1, delivery +2, profile +3; 0 picks free ports",
    )
    up.add_argument("--database-url", help="a postgresql+psycopg:// URL shared by all services (one schema each)")
    up.add_argument(
        "--email-provider",
        choices=["outbox", "smtp"],
        default="outbox",
        help="outbox writes .eml files under DATA_DIR/outbox; smtp sends to --smtp-host/--smtp-port",
    )
    up.add_argument("--smtp-host", default="127.0.0.1", help="SMTP server host (with --email-provider smtp)")
    up.add_argument("--smtp-port", type=int, default=25, help="SMTP server port (with --email-provider smtp)")
    up.add_argument(
        "--sms-api-url",
        help="Twilio-style API the SMS delivery worker posts to (default: env CARILLON_DELIVERY_SMS_API_URL, "
        "else https://api.twilio.com)",
    )
    up.add_argument("--log-format", choices=["console", "json"], default="console")
    up.add_argument("--sandbox", default="demo", help="sandbox the demo uses (default demo)")
    up.set_defaults(func=cmd_up)

    demo = commands.add_parser("demo", help="load the sample data and run the demo campaign on running services")
    demo.add_argument("--sandbox", default="demo", help="sandbox to use (default demo)")
    _add_endpoint_options(demo)
    demo.set_defaults(func=cmd_demo)

    ingest = commands.add_parser(
        "ingest",
        help="load a CSV or JSON Lines file into an entity",
        description="Stream a CSV (header row) or JSON Lines file into an entity in batches. Cells are typed by "
        "the entity's schema; a column `_op` with `d` deletes the record. Each batch is all-or-nothing; "
        "a refused batch is reported line by line.",
    )
    ingest.add_argument("entity", help="the entity id, e.g. customers")
    ingest.add_argument("file", help="a .csv or .jsonl file")
    ingest.add_argument("--format", choices=["csv", "jsonl"], help="default: from the file extension")
    ingest.add_argument("--batch-size", type=int, default=1000, help="rows per batch (default 1000)")
    ingest.add_argument("--sandbox", default="prod", help="sandbox (default prod)")
    _add_endpoint_options(ingest)
    ingest.set_defaults(func=cmd_ingest)

    status = commands.add_parser("status", help="gRPC health of each service")
    _add_endpoint_options(status)
    status.set_defaults(func=cmd_status)

    campaigns = commands.add_parser("campaigns", help="campaigns").add_subparsers(dest="action", required=True)
    clist = campaigns.add_parser("list", help="list the campaigns of a sandbox")
    clist.add_argument("--sandbox", default="demo")
    _add_endpoint_options(clist)
    clist.set_defaults(func=cmd_campaigns_list)

    runs = commands.add_parser("runs", help="runs of campaigns").add_subparsers(dest="action", required=True)
    rlist = runs.add_parser("list", help="runs of a campaign, newest first")
    rlist.add_argument("campaign", help="campaigns/{campaign}")
    rlist.add_argument("--limit", type=int, default=20)
    rlist.add_argument("--sandbox", default="demo")
    _add_endpoint_options(rlist)
    rlist.set_defaults(func=cmd_runs_list)
    rget = runs.add_parser("get", help="one run with its per-activity counts")
    rget.add_argument("run", help="campaigns/{campaign}/runs/{run}")
    rget.add_argument("--sandbox", default="demo")
    _add_endpoint_options(rget)
    rget.set_defaults(func=cmd_runs_get)
    add_watch_parser(runs, _add_endpoint_options)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except grpc.RpcError as err:
        console.print(f"[red]{err.code().name}[/red]: {err.details()}")
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
