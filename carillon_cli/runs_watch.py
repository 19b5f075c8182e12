"""``carillon runs watch RUN``: live progress bars of a run and its log, from the WatchRun stream.

One bar per activity: a channel activity's bar counts the recipients handled (sent, already sent,
skipped, failed) out of its targeted population; any other activity's bar fills when it finishes.
Log entries are printed above the bars as they arrive. The command ends with the run and exits 0
when it succeeded, 1 otherwise.

Wiring (in ``carillon_cli/main.py``'s ``build_parser``, on the ``runs`` sub-parsers)::

    from carillon_cli.runs_watch import add_watch_parser
    add_watch_parser(runs, _add_endpoint_options)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from carillon.scheduler.v1 import run_pb2
from carillon.scheduler.v1 import scheduler_service_pb2 as sch
from carillon.scheduler.v1 import scheduler_service_pb2_grpc as sch_grpc
from carillon_chassis.clients import call_metadata
from carillon_cli.endpoints import Endpoints


def _name(enum: object, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()  # type: ignore[attr-defined]


def handled(task: run_pb2.ActivityTask) -> int:
    """Recipients a channel task has dealt with, whatever the outcome."""
    return task.sent + task.already_sent + sum(task.skipped.values()) + sum(task.failed.values())


def _bar(task: run_pb2.ActivityTask) -> tuple[int, int]:
    """(completed, total) of a task's bar."""
    done = task.state in (run_pb2.TASK_STATE_SUCCEEDED, run_pb2.TASK_STATE_FAILED, run_pb2.TASK_STATE_SKIPPED)
    if task.checkpoint or handled(task):
        return handled(task), max(task.targeted, handled(task), 1)
    return (1 if done else 0), 1


def watch(stub: sch_grpc.CampaignServiceStub, run: str, sandbox: str, console: Console) -> int:
    """Follow ``run`` until it ends, drawing bars on ``console``; 0 when it succeeded, else 1."""
    state = run_pb2.RUN_STATE_UNSPECIFIED
    error = ""
    bars: dict[str, TaskID] = {}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        for event in stub.WatchRun(sch.WatchRunRequest(name=run), metadata=call_metadata(sandbox)):
            for entry in event.entries:
                level = _name(run_pb2.RunLogLevel, entry.level, "RUN_LOG_LEVEL_")
                where = f"[{entry.activity}] " if entry.activity else ""
                line = f"{entry.time.ToDatetime().isoformat()} {level:7} {where}{entry.message}"
                progress.console.print(line, markup=False, highlight=False)
            for task in event.run.tasks:
                completed, total = _bar(task)
                label = _name(run_pb2.TaskState, task.state, "TASK_STATE_")
                if task.activity not in bars:
                    bars[task.activity] = progress.add_task(task.activity, total=total, state=label)
                progress.update(bars[task.activity], completed=completed, total=total, state=label)
            state, error = event.run.state, event.run.error
    summary = f"{run}: {_name(run_pb2.RunState, state, 'RUN_STATE_')}" + (f": {error}" if error else "")
    console.print(summary, markup=False, highlight=False)
    return 0 if state == run_pb2.RUN_STATE_SUCCEEDED else 1


def cmd_runs_watch(args: argparse.Namespace) -> int:
    """Follow a run with live progress bars until it ends."""
    target = Endpoints.from_env(scheduler=getattr(args, "scheduler", None)).scheduler
    console = Console()
    with grpc.insecure_channel(target) as channel:
        try:
            return watch(sch_grpc.CampaignServiceStub(channel), args.run, args.sandbox, console)
        except grpc.RpcError as exc:
            console.print(f"error: {exc.code().name}: {exc.details()}")
            return 1


def add_watch_parser(
    runs: argparse._SubParsersAction,  # type: ignore[type-arg]
    add_endpoint_options: Callable[[argparse.ArgumentParser], None],
) -> argparse.ArgumentParser:
    """Add ``watch`` to the ``carillon runs`` sub-commands."""
    parser: argparse.ArgumentParser = runs.add_parser(
        "watch",
        help="follow a run with live progress bars until it ends",
        description="Stream a run's progress (WatchRun): one bar per activity and its log as it is written. "
        "Exits 0 when the run succeeded, 1 otherwise.",
    )
    parser.add_argument("run", help="campaigns/{campaign}/runs/{run}")
    parser.add_argument("--sandbox", default="demo")
    add_endpoint_options(parser)
    parser.set_defaults(func=cmd_runs_watch)
    return parser
