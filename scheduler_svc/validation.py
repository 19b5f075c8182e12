"""Checks of a campaign canvas, and the order in which its activities execute.

Pure functions over the domain canvas: every problem found is reported at once, as a
:class:`FieldViolation` naming its path in the request (``campaign.activities[1].channel.template``,
``campaign.transitions[0].target``). The guardrails (activities and channel activities per campaign)
are checked first and raise ``RESOURCE_EXHAUSTED`` naming the limit.
"""

from __future__ import annotations

import heapq
import re
import zoneinfo
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from carillon.audience.v1 import query_pb2, working_set_pb2
from carillon.type.v1 import value_pb2
from carillon_chassis.errors import FieldViolation, InvalidArgument, ResourceExhausted
from carillon_chassis.names import ID_PATTERN, ID_RULE, parse_name
from carillon_chassis.values import from_value
from scheduler_svc.model import (
    COMBINE_OPERATIONS,
    COMPARISONS,
    DEDUPLICATION_METHODS,
    ERROR_HANDLINGS,
    POPULATION_KINDS,
    Activity,
    BranchTest,
    BuildAudience,
    Canvas,
    ChangeDimension,
    ChannelSend,
    Combine,
    Deduplicate,
    End,
    Enrich,
    Fork,
    Join,
    ReadAudience,
    Reconcile,
    SaveAudience,
    SendWindow,
    Split,
    Transition,
    Wait,
    enrichment_chain,
    has_main_output,
    named_outputs,
    output_activity,
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
ATTRIBUTE_RULE = "attribute names are lower case letters, digits and _, starting with a letter"
MAX_TIME_LIMIT_S = 30 * 86400
MAX_SUBSETS = 100
MAX_DEDUPLICATION_FIELDS = 20
MAX_KEEP = 1000
# Collections per stream (audience_svc's limit), and linked records per collection.
MAX_COLLECTIONS = 10
MAX_COLLECTION_LIMIT = 100
LOCAL_TIME_PATTERN = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")


@dataclass(frozen=True)
class Limits:
    """The guardrails of one campaign (configurable; the defaults are the reference product's)."""

    max_activities: int = 500
    max_channel_activities: int = 10
    # The shortest time between two launch times of a day (interval and times of day), in minutes.
    min_schedule_interval_minutes: int = 15
    # The highest rate limit a channel activity may ask for, in messages per second.
    max_rate_per_second: int = 2000


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
    violations += canvas_violations(
        canvas, prefix, limits.min_schedule_interval_minutes, max_rate_per_second=limits.max_rate_per_second
    )
    if violations:
        raise InvalidArgument(
            f"invalid campaign: {violations[0].field}: {violations[0].description}"
            + (f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""),
            violations=violations,
            reason="INVALID_CANVAS",
        )


def canvas_violations(
    canvas: Canvas,
    prefix: str = "campaign",
    min_schedule_interval_minutes: int = 15,
    *,
    max_rate_per_second: int = 2000,
) -> list[FieldViolation]:
    """Every problem of the canvas, in field order: activities, transitions, then the schedule."""
    violations = _activity_violations(canvas, prefix, max_rate_per_second)
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


def _activity_violations(canvas: Canvas, prefix: str, max_rate_per_second: int = 2000) -> list[FieldViolation]:
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
            if kind.incremental is not None:
                violations += _incremental_violations(kind.incremental, f"{path}.build_audience.incremental")
        elif isinstance(kind, ChannelSend):
            violations += _channel_violations(kind, f"{path}.channel", max_rate_per_second)
        elif isinstance(kind, Enrich):
            violations += _enrich_violations(kind, f"{path}.enrich")
        elif isinstance(
            kind, ReadAudience | Combine | ChangeDimension | Split | Deduplicate | Reconcile | SaveAudience
        ):
            violations += _targeting_violations(activity.id, kind, path)
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
                elif not _is_scalar(kind.parameters[name]):
                    violations.append(
                        FieldViolation(f"{path}.end.parameters[{name!r}]", "a valid scalar value (no list or struct)")
                    )
        elif not isinstance(kind, Fork | Join | End):
            violations.append(FieldViolation(f"{path}.kind", "exactly one activity kind must be set"))
    violations += _working_set_id_violations(canvas, prefix, first_index)
    return violations


def _working_set_ids(activity: Activity) -> list[str]:
    """The activity ids, other than its own, under which an activity's named outputs build their working
    sets in audience_svc (idempotent per run and activity id)."""
    kind = activity.kind
    if not isinstance(kind, Split | Combine | Deduplicate | Reconcile):
        return []
    ids = [output_activity(activity.id, output) for output in named_outputs(kind)]
    if isinstance(kind, Combine) and kind.complement_output and kind.operation == "intersection":
        ids.append(f"{activity.id}--union-all")
    return ids


def _working_set_id_violations(canvas: Canvas, prefix: str, first_index: Mapping[str, int]) -> list[FieldViolation]:
    """An activity id equal to the working set id of another activity's named output would share its
    working set in audience_svc (``{activity}--{output}``): refused, naming the colliding id."""
    violations: list[FieldViolation] = []
    for i, activity in enumerate(canvas.activities):
        for derived in _working_set_ids(activity):
            j = first_index.get(derived)
            if j is not None:
                violations.append(
                    FieldViolation(
                        f"{prefix}.activities[{j}].id",
                        f"{derived!r} is taken by the working set of an output of {prefix}.activities[{i}]"
                        f" ({activity.id!r}); choose another activity id",
                    )
                )
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


def _output_name_violations(activity_id: str, output: str, field: str) -> list[FieldViolation]:
    if not OUTPUT_PATTERN.match(output):
        return [FieldViolation(field, OUTPUT_RULE)]
    if ID_PATTERN.match(activity_id) and not ID_PATTERN.match(output_activity(activity_id, output)):
        return [FieldViolation(field, "the activity id, '--' and the output name must fit in 63 characters")]
    return []


def _incremental_violations(incremental: working_set_pb2.Incremental, path: str) -> list[FieldViolation]:
    mode = incremental.WhichOneof("mode")
    if mode is None:
        return [FieldViolation(f"{path}.mode", "set processed_keys or watermark")]
    if mode == "processed_keys":
        window = incremental.processed_keys.history_window
        if window.seconds < 0 or window.nanos < 0:
            return [FieldViolation(f"{path}.processed_keys.history_window", "must not be negative")]
        return []
    if not ATTRIBUTE_NAME_PATTERN.match(incremental.watermark.attribute):
        return [FieldViolation(f"{path}.watermark.attribute", "a date or timestamp attribute: " + ATTRIBUTE_RULE)]
    return []


def _targeting_violations(
    activity_id: str,
    kind: ReadAudience | Combine | ChangeDimension | Split | Deduplicate | Reconcile | SaveAudience,
    path: str,
) -> list[FieldViolation]:
    """The problems of a targeting activity other than build_audience (its own fields only)."""
    violations: list[FieldViolation] = []

    def name(value: str, collection: str, field: str) -> None:
        problem = _name_violation(value, collection, field)
        if problem:
            violations.append(problem)

    if isinstance(kind, ReadAudience):
        name(kind.audience, "audiences", f"{path}.read_audience.audience")
        name(kind.dimension, "entities", f"{path}.read_audience.dimension")
    elif isinstance(kind, ChangeDimension):
        if not ATTRIBUTE_NAME_PATTERN.match(kind.link):
            violations.append(FieldViolation(f"{path}.change_dimension.link", "a link name: " + ATTRIBUTE_RULE))
        name(kind.dimension, "entities", f"{path}.change_dimension.dimension")
    elif isinstance(kind, Combine):
        where = f"{path}.combine"
        if kind.operation not in COMBINE_OPERATIONS:
            violations.append(FieldViolation(f"{where}.operation", f"one of {list(COMBINE_OPERATIONS)}"))
        if kind.complement_output:
            if kind.operation == "union":
                violations.append(FieldViolation(f"{where}.complement_output", "a union has no complement"))
            elif (
                kind.operation == "intersection"
                and ID_PATTERN.match(activity_id)
                and not ID_PATTERN.match(f"{activity_id}--union-all")
            ):
                violations.append(
                    FieldViolation(
                        f"{where}.complement_output",
                        "an intersection's complement needs an activity id of 52 characters at most",
                    )
                )
            violations += _output_name_violations(activity_id, kind.complement_output, f"{where}.complement_output")
    elif isinstance(kind, Split):
        where = f"{path}.split"
        if not kind.subsets:
            violations.append(FieldViolation(f"{where}.subsets", "a split needs at least one subset"))
        elif len(kind.subsets) > MAX_SUBSETS:
            violations.append(FieldViolation(f"{where}.subsets", f"at most {MAX_SUBSETS} subsets"))
        seen: set[str] = set()
        for j, subset in enumerate(kind.subsets):
            at = f"{where}.subsets[{j}]"
            problems = _output_name_violations(activity_id, subset.output, f"{at}.output")
            if not problems and subset.output in seen:
                problems = [FieldViolation(f"{at}.output", f"the output {subset.output!r} is used twice")]
            violations += problems
            seen.add(subset.output)
            if subset.limit < 0:
                violations.append(FieldViolation(f"{at}.limit", "0 (no limit) or more"))
            if not 0 <= subset.limit_percent <= 100:
                violations.append(FieldViolation(f"{at}.limit_percent", "a percentage from 0 to 100"))
            if subset.limit and subset.limit_percent:
                violations.append(FieldViolation(f"{at}.limit_percent", "not together with limit"))
            for k, (attribute, _) in enumerate(subset.order_by):
                if not ATTRIBUTE_NAME_PATTERN.match(attribute):
                    violations.append(FieldViolation(f"{at}.order_by[{k}].attribute", ATTRIBUTE_RULE))
        if kind.complement_output:
            field = f"{where}.complement_output"
            problems = _output_name_violations(activity_id, kind.complement_output, field)
            if not problems and kind.complement_output in seen:
                problems = [FieldViolation(field, f"the output {kind.complement_output!r} is used twice")]
            violations += problems
    elif isinstance(kind, Deduplicate):
        where = f"{path}.deduplicate"
        if not kind.fields:
            violations.append(FieldViolation(f"{where}.fields", "at least one attribute identifies duplicates"))
        elif len(kind.fields) > MAX_DEDUPLICATION_FIELDS:
            violations.append(FieldViolation(f"{where}.fields", f"at most {MAX_DEDUPLICATION_FIELDS} attributes"))
        for j, attribute in enumerate(kind.fields):
            if not ATTRIBUTE_NAME_PATTERN.match(attribute):
                violations.append(FieldViolation(f"{where}.fields[{j}]", ATTRIBUTE_RULE))
        if not 0 <= kind.keep <= MAX_KEEP:
            violations.append(FieldViolation(f"{where}.keep", f"0 (the default, 1) to {MAX_KEEP}"))
        if kind.method and kind.method not in DEDUPLICATION_METHODS:
            violations.append(FieldViolation(f"{where}.method", f"one of {list(DEDUPLICATION_METHODS)}"))
        if kind.method != "random" and not ATTRIBUTE_NAME_PATTERN.match(kind.attribute):
            violations.append(
                FieldViolation(f"{where}.attribute", "the attribute the method looks at: " + ATTRIBUTE_RULE)
            )
        if kind.method == "priority" and not kind.priority:
            violations.append(FieldViolation(f"{where}.priority", "the values in priority order"))
        if kind.priority and kind.method != "priority":
            violations.append(FieldViolation(f"{where}.priority", "only with the PRIORITY method"))
        if kind.removed_output:
            violations += _output_name_violations(activity_id, kind.removed_output, f"{where}.removed_output")
    elif isinstance(kind, Reconcile):
        where = f"{path}.reconcile"
        name(kind.target, "entities", f"{where}.target")
        if not kind.pairs:
            violations.append(FieldViolation(f"{where}.pairs", "at least one pair of attributes to match on"))
        for j, (source_attribute, target_attribute) in enumerate(kind.pairs):
            if not ATTRIBUTE_NAME_PATTERN.match(source_attribute):
                violations.append(FieldViolation(f"{where}.pairs[{j}].source_attribute", ATTRIBUTE_RULE))
            if not ATTRIBUTE_NAME_PATTERN.match(target_attribute):
                violations.append(FieldViolation(f"{where}.pairs[{j}].target_attribute", ATTRIBUTE_RULE))
        if kind.unreconciled_output:
            violations += _output_name_violations(activity_id, kind.unreconciled_output, f"{where}.unreconciled_output")
    else:
        if not ID_PATTERN.match(kind.audience_id):
            violations.append(
                FieldViolation(f"{path}.save_audience.audience_id", f"{ID_RULE}; got {kind.audience_id!r}")
            )
        if len(kind.display_name) > MAX_DISPLAY_NAME:
            violations.append(
                FieldViolation(f"{path}.save_audience.display_name", f"at most {MAX_DISPLAY_NAME} characters")
            )
    return violations


def _enrich_violations(kind: Enrich, path: str) -> list[FieldViolation]:
    """The problems of an enrich activity's own fields (names only: audience_svc checks that the links
    and attributes exist, and the filters, when the activity runs)."""
    violations: list[FieldViolation] = []
    if not (kind.attributes or kind.aggregates or kind.collections):
        violations.append(FieldViolation(path, "at least one attribute, aggregate or collection"))
    if len(kind.collections) > MAX_COLLECTIONS:
        violations.append(FieldViolation(f"{path}.collections", f"at most {MAX_COLLECTIONS} collections"))
    aliases: set[str] = set()
    paths = {p for _, p in kind.attributes}

    def alias(value: str, field: str) -> None:
        if not ATTRIBUTE_NAME_PATTERN.match(value):
            violations.append(FieldViolation(field, "an alias: " + OUTPUT_RULE))
        elif value in aliases:
            violations.append(FieldViolation(field, f"the alias {value!r} is used twice"))
        elif value in paths:
            violations.append(FieldViolation(field, f"the alias {value!r} is also an attribute path"))
        aliases.add(value)

    def name(value: str, field: str, what: str = "an attribute name") -> None:
        if not ATTRIBUTE_NAME_PATTERN.match(value):
            violations.append(FieldViolation(field, f"{what}: {ATTRIBUTE_RULE}"))

    for j, (alias_name, attribute_path) in enumerate(kind.attributes):
        at = f"{path}.attributes[{j}]"
        alias(alias_name, f"{at}.alias")
        if not all(ATTRIBUTE_NAME_PATTERN.match(part) for part in attribute_path.split(".")):
            violations.append(FieldViolation(f"{at}.path", "an attribute or a dot path of links: " + ATTRIBUTE_RULE))
    for j, aggregate in enumerate(kind.aggregates):
        at = f"{path}.aggregates[{j}]"
        alias(aggregate.alias, f"{at}.alias")
        name(aggregate.link, f"{at}.link", "a link name")
        if aggregate.measure == query_pb2.LINK_MEASURE_UNSPECIFIED:
            violations.append(FieldViolation(f"{at}.measure", "a measure must be set"))
        elif aggregate.measure != query_pb2.LINK_MEASURE_COUNT:
            name(aggregate.attribute, f"{at}.attribute", "the aggregated attribute")
    for j, collection in enumerate(kind.collections):
        at = f"{path}.collections[{j}]"
        alias(collection.alias, f"{at}.alias")
        name(collection.link, f"{at}.link", "a one-to-many link name")
        if not 1 <= collection.limit <= MAX_COLLECTION_LIMIT:
            violations.append(FieldViolation(f"{at}.limit", f"1 to {MAX_COLLECTION_LIMIT} linked records"))
        for k, attribute in enumerate(collection.attributes):
            name(attribute, f"{at}.attributes[{k}]")
        for k, key in enumerate(collection.order_by):
            name(key.attribute, f"{at}.order_by[{k}].attribute")
    return violations


def _enrichment_path_violations(canvas: Canvas, prefix: str) -> list[FieldViolation]:
    """Aliases that are not unique along a path (with every other alias, attribute path and the
    channel's target attributes), and too many collections for one channel's stream."""
    violations: list[FieldViolation] = []
    for i, activity in enumerate(canvas.activities):
        kind = activity.kind
        if not isinstance(kind, Enrich | ChannelSend):
            continue
        chain = enrichment_chain(canvas, activity.id)
        owner: dict[str, str] = {}
        for upstream_id, upstream in chain:
            for name in upstream.aliases() + [p for _, p in upstream.attributes]:
                owner.setdefault(name, upstream_id)
        path = f"{prefix}.activities[{i}]"
        if isinstance(kind, ChannelSend):
            for j, attribute in enumerate(kind.target_attributes):
                if attribute in owner and attribute not in {p for _, e in chain for _, p in e.attributes}:
                    violations.append(
                        FieldViolation(
                            f"{path}.channel.target_attributes[{j}]",
                            f"{attribute!r} is also an alias of the enrich activity {owner[attribute]!r} upstream",
                        )
                    )
            collections = sum(len(e.collections) for _, e in chain)
            if collections > MAX_COLLECTIONS:
                violations.append(
                    FieldViolation(
                        path,
                        f"the enrich activities upstream request {collections} collections; at most"
                        f" {MAX_COLLECTIONS} per channel activity",
                    )
                )
            continue
        fields = (
            [(a, f"attributes[{j}].alias") for j, (a, _) in enumerate(kind.attributes)]
            + [(p, f"attributes[{j}].path") for j, (_, p) in enumerate(kind.attributes)]
            + [(a.alias, f"aggregates[{j}].alias") for j, a in enumerate(kind.aggregates)]
            + [(c.alias, f"collections[{j}].alias") for j, c in enumerate(kind.collections)]
        )
        upstream_paths = {p for _, e in chain for _, p in e.attributes}
        for name, field in fields:
            if name in owner and not (field.endswith(".path") and name in upstream_paths):
                violations.append(
                    FieldViolation(
                        f"{path}.enrich.{field}",
                        f"{name!r} is already an alias or attribute path of the enrich activity"
                        f" {owner[name]!r} upstream (aliases are unique along a path)",
                    )
                )
    return violations


def _window_violations(window: SendWindow, path: str) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    for end in ("start_local_time", "end_local_time"):
        if not LOCAL_TIME_PATTERN.match(getattr(window, end)):
            violations.append(FieldViolation(f"{path}.{end}", "a local time HH:MM (24-hour clock)"))
    if window.start_local_time == window.end_local_time:
        violations.append(FieldViolation(f"{path}.end_local_time", "the window closes at another time than it opens"))
    if any(not 1 <= d <= 7 for d in window.days) or len(set(window.days)) != len(window.days):
        violations.append(FieldViolation(f"{path}.days_of_week", "distinct ISO days, 1 (Monday) to 7 (Sunday)"))
    if window.default_time_zone:
        try:
            zoneinfo.ZoneInfo(window.default_time_zone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            violations.append(FieldViolation(f"{path}.default_time_zone", "an IANA time zone, such as Europe/Paris"))
    return violations


def _channel_violations(channel: ChannelSend, path: str, max_rate_per_second: int = 2000) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    if not 0 <= channel.rate_limit_per_second <= max_rate_per_second:
        violations.append(
            FieldViolation(
                f"{path}.rate_limit_per_second",
                f"0 (no limit of its own) or 1 to {max_rate_per_second} messages per second",
            )
        )
    if channel.send_window is not None:
        violations += _window_violations(channel.send_window, f"{path}.send_window")
    if not 0 <= channel.time_limit_s <= MAX_TIME_LIMIT_S:
        violations.append(
            FieldViolation(f"{path}.time_limit", f"at least 1 second and at most {MAX_TIME_LIMIT_S // 86400} days")
        )
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
            violations.append(FieldViolation(field, ATTRIBUTE_RULE))
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
        names = named_outputs(source)
        if isinstance(source, BranchTest):
            if transition.output not in names:
                violations.append(
                    FieldViolation(f"{prefix}.transitions[{k}].output", f"one of the test's outputs {names}")
                )
        elif isinstance(source, Split):
            if transition.output not in names:
                violations.append(
                    FieldViolation(f"{prefix}.transitions[{k}].output", f"one of the split's outputs {names}")
                )
        elif transition.output and transition.output not in names:
            allowed = "" if not names else f" ({names} here)"
            violations.append(
                FieldViolation(
                    f"{prefix}.transitions[{k}].output",
                    "only tests, splits, combines with a complement and deduplications with a removed output "
                    "have named outputs" + allowed,
                )
            )
        if isinstance(source, End):
            violations.append(FieldViolation(f"{prefix}.transitions[{k}].source", "an end activity ends its branch"))
    for i, activity in enumerate(canvas.activities):
        if index[activity.id] != i:
            continue
        violations += _incoming_violations(activity.kind, i, incoming.get(activity.id, []), kinds, prefix)
        kind = activity.kind
        if isinstance(kind, Split | Combine | Deduplicate | ReadAudience | ChangeDimension | Reconcile):
            wired = {t.output for _, t in outgoing.get(activity.id, [])}
            expected = ([""] if has_main_output(kind) else []) + named_outputs(kind)
            for output in expected:
                if output not in wired:
                    label = f"output {output!r}" if output else "main output"
                    violations.append(
                        FieldViolation(
                            f"{prefix}.activities[{i}]",
                            f"its {label} needs a transition (to an end activity to end it)",
                        )
                    )
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
            needs_input = isinstance(
                activity.kind, ChannelSend | Combine | ChangeDimension | Split | Deduplicate | Reconcile
            )
            if (needs_input or isinstance(activity.kind, SaveAudience | Enrich)) and population_source(
                canvas, activity.id
            ) is None:
                what = "a channel activity" if isinstance(activity.kind, ChannelSend) else "this activity"
                violations.append(
                    FieldViolation(
                        f"{prefix}.activities[{i}]",
                        f"{what} needs a targeting activity upstream (build or read audience) to give it a population",
                    )
                )
        if not violations:
            violations += _dimension_violations(canvas, prefix)
            violations += _enrichment_path_violations(canvas, prefix)
    return violations


def _dimension_of(kind: object) -> str | None:
    """The dimension an activity's own population has, or None when it passes its input's on."""
    if isinstance(kind, BuildAudience):
        return kind.query.dimension
    if isinstance(kind, ReadAudience | ChangeDimension):
        return kind.dimension
    if isinstance(kind, Reconcile):
        return kind.target
    return None


def dimensions(canvas: Canvas) -> dict[str, str]:
    """The dimension of each activity's population, tracked along the transitions (the canvas must be
    acyclic): a build or read audience sets it, a change of dimension or a reconciliation changes it,
    every other activity passes on its (primary) input's."""
    return _dimensions(canvas)[0]


def _dimensions(canvas: Canvas) -> tuple[dict[str, str], dict[str, str]]:
    """The dimension of each activity's population, and of the population entering it."""
    found: dict[str, str] = {}
    entering: dict[str, str] = {}
    for activity_id in topological_order(canvas):
        kind = (canvas.find(activity_id) or Activity(activity_id)).kind
        incoming = [t for t in canvas.transitions if t.target == activity_id]
        primary = kind.primary if isinstance(kind, Join | Combine) and kind.primary else ""
        chosen = next((t for t in incoming if t.source == primary), incoming[0] if incoming else None)
        if chosen is not None:
            dimension = transition_dimension(canvas, chosen, found, entering)
            if dimension:
                entering[activity_id] = dimension
        own = _dimension_of(kind)
        if own is not None:
            found[activity_id] = own
        elif activity_id in entering:
            found[activity_id] = entering[activity_id]
    return found, entering


def transition_dimension(
    canvas: Canvas, transition: Transition, found: Mapping[str, str], entering: Mapping[str, str]
) -> str:
    """The dimension of the population along a transition: its source's, but a reconciliation's
    unreconciled output keeps the dimension that entered the reconciliation."""
    kind = (canvas.find(transition.source) or Activity(transition.source)).kind
    if isinstance(kind, Reconcile) and transition.output and transition.output == kind.unreconciled_output:
        return entering.get(transition.source, "")
    return found.get(transition.source, "")


def _dimension_violations(canvas: Canvas, prefix: str) -> list[FieldViolation]:
    """A combine whose inputs have different dimensions (each activity's dimension tracked through the canvas)."""
    violations: list[FieldViolation] = []
    found, entering = _dimensions(canvas)
    for k, transition in enumerate(canvas.transitions):
        target = canvas.find(transition.target)
        if target is None or not isinstance(target.kind, Combine):
            continue
        expected = found.get(transition.target)
        actual = transition_dimension(canvas, transition, found, entering)
        if expected and actual and expected != actual:
            violations.append(
                FieldViolation(
                    f"{prefix}.transitions[{k}].source",
                    f"the population from {transition.source!r} has the dimension {actual}; the combine "
                    f"{transition.target!r} combines {expected} (every input needs the same dimension)",
                )
            )
    return violations


def _incoming_violations(
    kind: object, i: int, edges: list[tuple[int, Transition]], kinds: Mapping[str, object], prefix: str
) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    path = f"{prefix}.activities[{i}]"
    if isinstance(kind, Join | Combine):
        what = "join" if isinstance(kind, Join) else "combine"
        if len(edges) < 2:
            violations.append(FieldViolation(path, f"a {what} needs at least two incoming transitions"))
        elif kind.primary and kind.primary not in {t.source for _, t in edges}:
            violations.append(
                FieldViolation(f"{path}.{what}.primary", f"the source of one of the {what}'s transitions")
            )
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
    elif isinstance(kind, ChangeDimension | Split | Deduplicate | Reconcile | SaveAudience | Enrich) and not edges:
        return [FieldViolation(path, "this activity needs one incoming transition, from the population")]
    for k, _ in edges[1:]:
        violations.append(
            FieldViolation(
                f"{prefix}.transitions[{k}].target", "only a join has several incoming transitions; add a join"
            )
        )
    return violations


def population_source(canvas: Canvas, activity_id: str) -> str | None:
    """The targeting activity whose working set reaches ``activity_id`` (through flow, channel and save
    activities; a join's or combine's primary input), or None. The canvas must be acyclic."""
    current = activity_id
    while True:
        sources = canvas.sources_of(current)
        if not sources:
            return None
        kind = (canvas.find(current) or Activity(current)).kind
        current = kind.primary if isinstance(kind, Join | Combine) and kind.primary else sources[0]
        if isinstance((canvas.find(current) or Activity(current)).kind, POPULATION_KINDS):
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


def _is_scalar(value: value_pb2.Value) -> bool:
    """Whether ``value`` is a valid scalar Value (branch conditions of the signalled run read it as one)."""
    try:
        from_value(value)
    except (ValueError, ArithmeticError):
        return False
    return True
