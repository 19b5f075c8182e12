"""Checks of a campaign canvas, and the order in which its activities execute.

Pure functions over the domain canvas: every problem found is reported at once, as a
:class:`FieldViolation` naming its path in the request (``campaign.activities[1].channel.template``,
``campaign.transitions[0].target``). The guardrails (activities and channel activities per campaign)
are checked first and raise ``RESOURCE_EXHAUSTED`` naming the limit.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from carillon_chassis.errors import FieldViolation, InvalidArgument, ResourceExhausted
from carillon_chassis.names import ID_PATTERN, ID_RULE, parse_name
from scheduler_svc.model import (
    COMPARISONS,
    ERROR_HANDLINGS,
    Activity,
    BranchTest,
    BuildAudience,
    Canvas,
    ChannelSend,
    End,
    Fork,
    Join,
    Transition,
    Wait,
)
from scheduler_svc.schedules import schedule_violations

MAX_BATCH_SIZE = 10000
MAX_WAIT_S = 90 * 86400
MAX_VARIABLES = 100
MAX_VARIABLE_VALUE = 1000
OUTPUT_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
OUTPUT_RULE = "lower case letters, digits and _, starting with a letter"
MAX_DISPLAY_NAME = 200
MAX_TARGET_ATTRIBUTES = 200
# The attribute-name rule of the audience contract (carillon.audience.v1.Attribute.name).
ATTRIBUTE_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class Limits:
    """The guardrails of one campaign (configurable; the defaults are the reference product's)."""

    max_activities: int = 500
    max_channel_activities: int = 10
    # The shortest time between two launch times of a day (interval and times of day), in minutes.
    min_schedule_interval_minutes: int = 15


def check_guardrails(canvas: Canvas, limits: Limits, prefix: str = "campaign") -> None:
    """Raise RESOURCE_EXHAUSTED, naming the limit, when the canvas has too many activities."""
    field = f"{prefix}.activities"
    if len(canvas.activities) > limits.max_activities:
        raise ResourceExhausted(
            f"a campaign has at most {limits.max_activities} activities (max_activities); got {len(canvas.activities)}",
            field=field,
            reason="TOO_MANY_ACTIVITIES",
            metadata={"limit": "max_activities", "value": str(limits.max_activities)},
        )
    channels = sum(isinstance(a.kind, ChannelSend) for a in canvas.activities)
    if channels > limits.max_channel_activities:
        raise ResourceExhausted(
            f"a campaign has at most {limits.max_channel_activities} channel activities "
            f"(max_channel_activities); got {channels}",
            field=field,
            reason="TOO_MANY_CHANNEL_ACTIVITIES",
            metadata={"limit": "max_channel_activities", "value": str(limits.max_channel_activities)},
        )


def validate_campaign(display_name: str, canvas: Canvas, limits: Limits, prefix: str = "campaign") -> None:
    """Raise RESOURCE_EXHAUSTED for a guardrail, else INVALID_ARGUMENT listing every bad field."""
    check_guardrails(canvas, limits, prefix)
    violations: list[FieldViolation] = []
    if len(display_name) > MAX_DISPLAY_NAME:
        violations.append(FieldViolation(f"{prefix}.display_name", f"at most {MAX_DISPLAY_NAME} characters"))
    violations += canvas_violations(canvas, prefix, limits.min_schedule_interval_minutes)
    if violations:
        raise InvalidArgument(
            f"invalid campaign: {violations[0].field}: {violations[0].description}"
            + (f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""),
            violations=violations,
            reason="INVALID_CANVAS",
        )


def canvas_violations(
    canvas: Canvas, prefix: str = "campaign", min_schedule_interval_minutes: int = 15
) -> list[FieldViolation]:
    """Every problem of the canvas, in field order: activities, transitions, then the schedule."""
    violations = _activity_violations(canvas, prefix)
    violations += _transition_violations(canvas, prefix)
    if canvas.error_handling not in ERROR_HANDLINGS:
        violations.append(FieldViolation(f"{prefix}.error_handling", f"one of {list(ERROR_HANDLINGS)}"))
    if len(canvas.variables) > MAX_VARIABLES:
        violations.append(FieldViolation(f"{prefix}.variables", f"at most {MAX_VARIABLES} variables"))
    for name, value in sorted(canvas.variables.items()):
        if not OUTPUT_PATTERN.match(name):
            violations.append(FieldViolation(f"{prefix}.variables[{name!r}]", "a variable name: " + OUTPUT_RULE))
        elif len(value) > MAX_VARIABLE_VALUE:
            violations.append(
                FieldViolation(f"{prefix}.variables[{name!r}]", f"at most {MAX_VARIABLE_VALUE} characters")
            )
    violations += _schedule_violations(canvas, prefix, min_schedule_interval_minutes)
    return violations


def _name_violation(value: str, collection: str, field: str) -> FieldViolation | None:
    try:
        parse_name(value, collection, field=field)
    except InvalidArgument as exc:
        return FieldViolation(field, exc.message)
    return None


def _activity_violations(canvas: Canvas, prefix: str) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    if not canvas.activities:
        return [FieldViolation(f"{prefix}.activities", "a campaign needs at least one activity")]
    first_index: dict[str, int] = {}
    for i, activity in enumerate(canvas.activities):
        path = f"{prefix}.activities[{i}]"
        if not ID_PATTERN.match(activity.id):
            violations.append(FieldViolation(f"{path}.id", f"{ID_RULE}; got {activity.id!r}"))
        elif activity.id in first_index:
            violations.append(
                FieldViolation(f"{path}.id", f"duplicates {prefix}.activities[{first_index[activity.id]}].id")
            )
        else:
            first_index[activity.id] = i
        if len(activity.display_name) > MAX_DISPLAY_NAME:
            violations.append(FieldViolation(f"{path}.display_name", f"at most {MAX_DISPLAY_NAME} characters"))
        kind = activity.kind
        if isinstance(kind, BuildAudience):
            problem = _name_violation(kind.query.dimension, "entities", f"{path}.build_audience.query.dimension")
            if problem:
                violations.append(problem)
        elif isinstance(kind, ChannelSend):
            violations += _channel_violations(kind, f"{path}.channel")
        elif isinstance(kind, Wait):
            if (kind.duration_s > 0) == (kind.until is not None):
                violations.append(FieldViolation(f"{path}.wait", "exactly one of duration or until_time is required"))
            elif not 0 <= kind.duration_s <= MAX_WAIT_S:
                violations.append(FieldViolation(f"{path}.wait.duration", f"at most {MAX_WAIT_S // 86400} days"))
        elif isinstance(kind, BranchTest):
            violations += _test_violations(kind, f"{path}.test")
        elif isinstance(kind, End) and kind.signal_campaign:
            problem = _name_violation(kind.signal_campaign, "campaigns", f"{path}.end.signal_campaign")
            if problem:
                violations.append(problem)
            for name in sorted(kind.parameters):
                if not OUTPUT_PATTERN.match(name):
                    violations.append(FieldViolation(f"{path}.end.parameters[{name!r}]", OUTPUT_RULE))
        elif not isinstance(kind, Fork | Join | End):
            violations.append(FieldViolation(f"{path}.kind", "exactly one activity kind must be set"))
    return violations


def _test_violations(test: BranchTest, path: str) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    if not test.branches:
        violations.append(FieldViolation(f"{path}.branches", "a test needs at least one branch"))
    seen: set[str] = set()
    for j, branch in enumerate(test.branches):
        where = f"{path}.branches[{j}]"
        if not OUTPUT_PATTERN.match(branch.output):
            violations.append(FieldViolation(f"{where}.output", OUTPUT_RULE))
        elif branch.output in seen or branch.output == test.default_output:
            violations.append(FieldViolation(f"{where}.output", f"the output {branch.output!r} is used twice"))
        seen.add(branch.output)
        condition = branch.condition
        kind = "variable" if condition.variable else "population"
        if condition.comparison not in COMPARISONS:
            violations.append(FieldViolation(f"{where}.{kind}.comparison", "a comparison must be set"))
        if condition.variable and not OUTPUT_PATTERN.match(condition.variable):
            violations.append(FieldViolation(f"{where}.variable.name", "a variable name: " + OUTPUT_RULE))
        if not condition.variable and not re.fullmatch(r"-?[0-9]{1,18}", condition.value):
            violations.append(FieldViolation(f"{where}.population.value", "a whole number"))
    if not OUTPUT_PATTERN.match(test.default_output):
        violations.append(FieldViolation(f"{path}.default_output", OUTPUT_RULE))
    return violations


def _channel_violations(channel: ChannelSend, path: str) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    if not channel.channel:
        violations.append(FieldViolation(f"{path}.channel", "the channel must be set"))
    if not channel.category:
        violations.append(FieldViolation(f"{path}.category", "the category must be set"))
    problem = _name_violation(channel.template, "templates", f"{path}.template")
    if problem:
        violations.append(problem)
    if not 0 <= channel.batch_size <= MAX_BATCH_SIZE:
        violations.append(
            FieldViolation(f"{path}.batch_size", f"0 (the default) or 1 to {MAX_BATCH_SIZE}; got {channel.batch_size}")
        )
    if len(channel.target_attributes) > MAX_TARGET_ATTRIBUTES:
        violations.append(FieldViolation(f"{path}.target_attributes", f"at most {MAX_TARGET_ATTRIBUTES} attributes"))
    seen: set[str] = set()
    for j, attribute in enumerate(channel.target_attributes):
        field = f"{path}.target_attributes[{j}]"
        if not ATTRIBUTE_NAME_PATTERN.match(attribute):
            violations.append(
                FieldViolation(field, "attribute names are lower case letters, digits and _, starting with a letter")
            )
        elif attribute in seen:
            violations.append(FieldViolation(field, f"{attribute!r} is listed twice"))
        seen.add(attribute)
    return violations


def _transition_violations(canvas: Canvas, prefix: str) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    kinds = {a.id: a.kind for a in canvas.activities}
    index = {a.id: i for i, a in reversed(list(enumerate(canvas.activities)))}
    usable: list[tuple[int, Transition]] = []
    seen: dict[Transition, int] = {}
    for k, transition in enumerate(canvas.transitions):
        path = f"{prefix}.transitions[{k}]"
        bad = False
        for end in ("source", "target"):
            value = getattr(transition, end)
            if value not in kinds:
                violations.append(FieldViolation(f"{path}.{end}", f"no activity has the id {value!r}"))
                bad = True
        if bad:
            continue
        if transition.source == transition.target:
            violations.append(FieldViolation(f"{path}.target", "a transition cannot lead back to its source"))
            continue
        if transition in seen:
            violations.append(FieldViolation(path, f"duplicates {prefix}.transitions[{seen[transition]}]"))
            continue
        seen[transition] = k
        usable.append((k, transition))
    cycle = find_cycle([a.id for a in canvas.activities], [t for _, t in usable])
    if cycle is not None:
        closing = usable[cycle[-1]]
        route = " -> ".join([usable[c][1].source for c in cycle] + [usable[cycle[0]][1].source])
        violations.append(FieldViolation(f"{prefix}.transitions[{closing[0]}]", f"closes a cycle: {route}"))
    incoming: dict[str, list[tuple[int, Transition]]] = {}
    outgoing: dict[str, list[tuple[int, Transition]]] = {}
    for k, transition in usable:
        incoming.setdefault(transition.target, []).append((k, transition))
        outgoing.setdefault(transition.source, []).append((k, transition))
    for k, transition in usable:
        source = kinds[transition.source]
        if isinstance(source, BranchTest):
            names = [b.output for b in source.branches] + [source.default_output]
            if transition.output not in names:
                violations.append(
                    FieldViolation(f"{prefix}.transitions[{k}].output", f"one of the test's outputs {names}")
                )
        elif transition.output:
            violations.append(
                FieldViolation(f"{prefix}.transitions[{k}].output", "only a test activity has named outputs")
            )
        if isinstance(source, End):
            violations.append(FieldViolation(f"{prefix}.transitions[{k}].source", "an end activity ends its branch"))
    for i, activity in enumerate(canvas.activities):
        if index[activity.id] != i:
            continue
        violations += _incoming_violations(activity.kind, i, incoming.get(activity.id, []), kinds, prefix)
        kind = activity.kind
        if isinstance(kind, BranchTest):
            wired = {t.output for _, t in outgoing.get(activity.id, [])}
            for j, branch in enumerate(kind.branches):
                if branch.output not in wired:
                    violations.append(
                        FieldViolation(
                            f"{prefix}.activities[{i}].test.branches[{j}].output",
                            "every output needs a transition (to an end activity to end it)",
                        )
                    )
            if kind.default_output not in wired:
                violations.append(
                    FieldViolation(
                        f"{prefix}.activities[{i}].test.default_output",
                        "every output needs a transition (to an end activity to end it)",
                    )
                )
    if cycle is None and not violations:
        for i, activity in enumerate(canvas.activities):
            if isinstance(activity.kind, ChannelSend) and population_source(canvas, activity.id) is None:
                violations.append(
                    FieldViolation(
                        f"{prefix}.activities[{i}]",
                        "a channel activity needs a build_audience activity upstream to give it a population",
                    )
                )
    return violations


def _incoming_violations(
    kind: object, i: int, edges: list[tuple[int, Transition]], kinds: Mapping[str, object], prefix: str
) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    path = f"{prefix}.activities[{i}]"
    if isinstance(kind, Join):
        if len(edges) < 2:
            violations.append(FieldViolation(path, "a join needs at least two incoming transitions"))
        elif kind.primary and kind.primary not in {t.source for _, t in edges}:
            violations.append(FieldViolation(f"{path}.join.primary", "the source of one of the join's transitions"))
        return violations
    if isinstance(kind, ChannelSend):
        if not edges:
            return [
                FieldViolation(path, "a channel activity needs exactly one incoming transition, from the population")
            ]
        k, transition = edges[0]
        if isinstance(kinds[transition.source], ChannelSend):
            violations.append(
                FieldViolation(
                    f"{prefix}.transitions[{k}].source",
                    "the incoming transition of a channel activity must come from a targeting or flow activity",
                )
            )
    elif isinstance(kind, Fork | Wait | BranchTest | End) and not edges:
        return [FieldViolation(path, "a flow activity needs one incoming transition")]
    for k, _ in edges[1:]:
        violations.append(
            FieldViolation(
                f"{prefix}.transitions[{k}].target", "only a join has several incoming transitions; add a join"
            )
        )
    return violations


def population_source(canvas: Canvas, activity_id: str) -> str | None:
    """The build_audience activity whose working set reaches ``activity_id`` (through flow and channel
    activities; a join's primary input), or None. The canvas must be acyclic."""
    current = activity_id
    while True:
        sources = canvas.sources_of(current)
        if not sources:
            return None
        kind = (canvas.find(current) or Activity(current)).kind
        current = kind.primary if isinstance(kind, Join) and kind.primary else sources[0]
        if isinstance((canvas.find(current) or Activity(current)).kind, BuildAudience):
            return current


def _schedule_violations(canvas: Canvas, prefix: str, min_interval_minutes: int) -> list[FieldViolation]:
    return schedule_violations(canvas.schedule, f"{prefix}.schedule", min_interval_minutes)


def find_cycle(activity_ids: Sequence[str], transitions: Sequence[Transition]) -> list[int] | None:
    """The indexes of transitions forming a cycle (in path order), or None when the graph is acyclic."""
    outgoing: dict[str, list[int]] = {a: [] for a in activity_ids}
    for k, transition in enumerate(transitions):
        outgoing.setdefault(transition.source, []).append(k)
    done: set[str] = set()
    for start in activity_ids:
        if start in done:
            continue
        # An iterative depth-first search; path[i] is the transition from nodes[i] to nodes[i + 1].
        nodes: list[str] = [start]
        cursors: list[int] = [0]
        path: list[int] = []
        while nodes:
            node = nodes[-1]
            edges = outgoing.get(node, [])
            if cursors[-1] == len(edges):
                done.add(node)
                nodes.pop()
                cursors.pop()
                if path:
                    path.pop()
                continue
            k = edges[cursors[-1]]
            cursors[-1] += 1
            target = transitions[k].target
            if target in nodes:
                return [*path[nodes.index(target) :], k]
            if target not in done:
                nodes.append(target)
                cursors.append(0)
                path.append(k)
    return None


def topological_order(canvas: Canvas) -> list[str]:
    """The activity ids in execution order: every source before its targets; ties in canvas order.

    The canvas must be acyclic (validated); a cycle raises ValueError.
    """
    position = {a.id: i for i, a in enumerate(canvas.activities)}
    indegree = dict.fromkeys(position, 0)
    outgoing: dict[str, list[str]] = {a: [] for a in position}
    for transition in dict.fromkeys(canvas.transitions):
        outgoing[transition.source].append(transition.target)
        indegree[transition.target] += 1
    ready = [(position[a], a) for a, degree in indegree.items() if degree == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, activity = heapq.heappop(ready)
        order.append(activity)
        for target in outgoing[activity]:
            indegree[target] -= 1
            if indegree[target] == 0:
                heapq.heappush(ready, (position[target], target))
    if len(order) != len(position):
        raise ValueError("the canvas has a cycle")
    return order
