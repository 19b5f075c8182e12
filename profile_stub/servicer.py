"""The ProfileService servicer: translates protobuf requests to ProfileStore calls and back."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from datetime import UTC, datetime

import grpc
from google.protobuf import timestamp_pb2

from carillon.profile.v1 import profile_pb2, profile_service_pb2, profile_service_pb2_grpc
from carillon.type.v1 import channel_pb2, value_pb2
from carillon_chassis.channels import category_name, category_value, channel_name, channel_value
from carillon_chassis.errors import FieldViolation, InvalidArgument
from carillon_chassis.names import ID_PATTERN, parse_name
from carillon_chassis.sandbox import current_sandbox
from carillon_chassis.values import from_timestamp, from_value_map, to_timestamp, to_value_map
from profile_stub.capping import CappingRule
from profile_stub.profiles import Communication, Consent, Eligibility, MessageKeys, Profile, ProfileStore
from profile_stub.quarantine import DeliveryEvent, Quarantine

_STATE_NAMES = {
    profile_pb2.CONSENT_STATE_OPTED_IN: "opted_in",
    profile_pb2.CONSENT_STATE_OPTED_OUT: "opted_out",
}
_STATE_VALUES = {name: value for value, name in _STATE_NAMES.items()}
_VERDICTS = {
    "allowed": profile_pb2.VERDICT_ALLOWED,
    "no_consent": profile_pb2.VERDICT_NO_CONSENT,
    "quarantined": profile_pb2.VERDICT_QUARANTINED,
    "capped": profile_pb2.VERDICT_CAPPED,
    "missing_address": profile_pb2.VERDICT_MISSING_ADDRESS,
    "unknown_profile": profile_pb2.VERDICT_UNKNOWN_PROFILE,
}

_EVENT_KINDS = {
    profile_pb2.DELIVERY_EVENT_TYPE_DELIVERED: "delivered",
    profile_pb2.DELIVERY_EVENT_TYPE_SOFT_BOUNCE: "soft_bounce",
    profile_pb2.DELIVERY_EVENT_TYPE_HARD_BOUNCE: "hard_bounce",
    profile_pb2.DELIVERY_EVENT_TYPE_COMPLAINT: "complaint",
    profile_pb2.DELIVERY_EVENT_TYPE_UNSUBSCRIBE: "unsubscribe",
}
_PERIODS = {
    profile_pb2.CAPPING_PERIOD_DAY: "day",
    profile_pb2.CAPPING_PERIOD_WEEK: "week",
    profile_pb2.CAPPING_PERIOD_MONTH: "month",
}
_PERIOD_VALUES = {name: value for value, name in _PERIODS.items()}
_TIME_BASES = {
    profile_pb2.CAPPING_TIME_BASIS_UNSPECIFIED: "utc",
    profile_pb2.CAPPING_TIME_BASIS_UTC: "utc",
    profile_pb2.CAPPING_TIME_BASIS_PROFILE: "profile",
}
_MAX_PAGE = 1000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def quarantine_to_proto(state: Quarantine) -> profile_pb2.Quarantine:
    """The Quarantine message of a domain state."""
    message = profile_pb2.Quarantine(
        channel=channel_pb2.Channel.ValueType(channel_value(state.channel)),
        address=state.address,
        quarantined=state.quarantined,
        soft_bounce_count=state.soft_bounces,
        reason=state.reason,
    )
    if state.quarantine_time:
        message.quarantine_time.CopyFrom(to_timestamp(state.quarantine_time))
    if state.update_time:
        message.update_time.CopyFrom(to_timestamp(state.update_time))
    return message


def capping_rule_to_proto(rule: CappingRule) -> profile_pb2.CappingRule:
    """The CappingRule message of a domain rule."""
    message = profile_pb2.CappingRule(
        name=f"cappingRules/{rule.rule_id}",
        channel=channel_pb2.Channel.ValueType(channel_value(rule.channel)),
        max_messages=rule.max_messages,
        period=_PERIOD_VALUES.get(rule.period, profile_pb2.CAPPING_PERIOD_UNSPECIFIED),
        time_basis=profile_pb2.CAPPING_TIME_BASIS_PROFILE
        if rule.time_basis == "profile"
        else profile_pb2.CAPPING_TIME_BASIS_UTC,
    )
    if rule.create_time:
        message.create_time.CopyFrom(to_timestamp(rule.create_time))
    return message


def communication_to_proto(c: Communication) -> profile_pb2.Communication:
    """The Communication message of a domain communication."""
    message = profile_pb2.Communication(
        profile=f"profiles/{c.profile_id}",
        channel=channel_pb2.Channel.ValueType(channel_value(c.channel)),
        category=channel_pb2.MessageCategory.ValueType(category_value(c.category)),
        campaign=c.campaign,
        run=c.run,
        activity=c.activity,
        message_id=c.message_id,
    )
    if c.send_time:
        message.send_time.CopyFrom(to_timestamp(c.send_time))
    return message


def _profile_id(name: str, index: int) -> str:
    """The profile id of ``communications[index].profile``: a ``profiles/{id}`` name checked like
    ``parse_name`` does (which raises the precise error), without building its message for every valid one."""
    profile_id = name[9:]
    if name.startswith("profiles/") and "/" not in profile_id and ID_PATTERN.match(profile_id):
        return profile_id
    return parse_name(name, "profiles", field=f"communications[{index}].profile")[0]


def encode_cursor(cursor: tuple[datetime, str] | None) -> str:
    """An opaque page token of a history cursor ("" for none)."""
    if cursor is None:
        return ""
    raw = json.dumps([cursor[0].isoformat(), cursor[1]]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_cursor(token: str) -> tuple[datetime, str] | None:
    """The history cursor of a page token; INVALID_ARGUMENT when it is malformed."""
    if not token:
        return None
    try:
        when, message_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        return datetime.fromisoformat(when), str(message_id)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise InvalidArgument("malformed page token", field="page_token", reason="INVALID_PAGE_TOKEN") from exc


def profile_from_proto(message: profile_pb2.Profile, index: int) -> Profile:
    """The domain profile of a Profile message (``index`` names it in errors)."""
    (profile_id,) = parse_name(message.name, "profiles", field=f"profiles[{index}].name")
    return Profile(
        profile_id=profile_id,
        identities=[(i.namespace, i.value) for i in message.identities],
        first_name=message.first_name,
        last_name=message.last_name,
        locale=message.locale,
        time_zone=message.time_zone,
        country=message.country,
        attributes=dict(from_value_map(message.attributes)),
        consents=[
            Consent(
                channel_name(c.channel),
                _STATE_NAMES.get(c.state, "unknown"),
                c.source,
                purpose=c.purpose or "marketing",
            )
            for c in message.consents
        ],
    )


def _set_time(stamp: timestamp_pb2.Timestamp, value: datetime, cache: dict[datetime, tuple[int, int]]) -> None:
    """Set a Timestamp field in place: what ``to_timestamp`` gives, without a message per value (the
    eligibility of a batch sets three per profile); ``cache`` keeps the (seconds, nanos) of the values
    seen already (profiles loaded together share their times)."""
    pair = cache.get(value)
    if pair is None:
        delta = (value if value.tzinfo is not None else value.replace(tzinfo=UTC)) - _EPOCH
        pair = cache[value] = (delta.days * 86_400 + delta.seconds, delta.microseconds * 1000)
    stamp.seconds, stamp.nanos = pair


def _fill_profile(
    message: profile_pb2.Profile,
    profile: Profile,
    attributes: Mapping[str, value_pb2.Value],
    times: dict[datetime, tuple[int, int]],
    *,
    personalization: bool = False,
) -> None:
    """Fill an empty Profile message (``attributes``: the profile's attributes as Values; ``times``: the
    cache of ``_set_time``). Empty strings are left unset, which is the same message. With
    ``personalization`` (PROFILE_VIEW_PERSONALIZATION), no attributes, consents or times."""
    message.name = f"profiles/{profile.profile_id}"
    add_identity = message.identities.add
    for ns, v in profile.identities:
        add_identity(namespace=ns, value=v)
    if profile.first_name:
        message.first_name = profile.first_name
    if profile.last_name:
        message.last_name = profile.last_name
    if profile.locale:
        message.locale = profile.locale
    if profile.time_zone:
        message.time_zone = profile.time_zone
    if profile.country:
        message.country = profile.country
    if personalization:
        return
    for key, value in attributes.items():
        message.attributes[key].CopyFrom(value)
    for consent in profile.consents:
        item = message.consents.add(
            channel=channel_value(consent.channel),
            state=_STATE_VALUES.get(consent.state, profile_pb2.CONSENT_STATE_UNSPECIFIED),
            source=consent.source,
            purpose="" if consent.purpose == "marketing" else consent.purpose,
        )
        if consent.update_time:
            _set_time(item.update_time, consent.update_time, times)
    if profile.create_time:
        _set_time(message.create_time, profile.create_time, times)
    if profile.update_time:
        _set_time(message.update_time, profile.update_time, times)


def profile_to_proto(profile: Profile) -> profile_pb2.Profile:
    """The Profile message of a domain profile."""
    message = profile_pb2.Profile()
    _fill_profile(message, profile, to_value_map(profile.attributes) if profile.attributes else {}, {})
    return message


def eligibility_to_proto(
    result: Eligibility, *, with_profile: bool = True, personalization: bool = False
) -> profile_pb2.EligibilityResult:
    """The EligibilityResult message of a domain verdict (without the profile unless ``with_profile``;
    ``personalization``: PROFILE_VIEW_PERSONALIZATION)."""
    message = profile_pb2.EligibilityResult()
    fill_eligibility(message, result, with_profile=with_profile, times={}, personalization=personalization)
    return message


def fill_eligibility(
    message: profile_pb2.EligibilityResult,
    result: Eligibility,
    *,
    with_profile: bool,
    times: dict[datetime, tuple[int, int]],
    personalization: bool = False,
) -> None:
    """Fill an empty EligibilityResult in place (one per recipient: built where it is sent, not copied);
    ``times`` is the batch's cache of timestamps; ``personalization``: the profile as
    PROFILE_VIEW_PERSONALIZATION has it (its attributes in the result's ``attributes`` only)."""
    message.identity.namespace, message.identity.value = result.identity
    message.verdict = _VERDICTS[result.verdict]
    if result.address:
        message.address = result.address
    if result.addresses:
        message.addresses.extend(result.addresses)
    if result.reserved:
        message.reserved = True
        message.message_id = result.message_id
    if with_profile and result.profile is not None:
        attributes = to_value_map(result.profile.attributes) if result.profile.attributes else {}
        _fill_profile(message.profile, result.profile, attributes, times, personalization=personalization)
        for key, value in attributes.items():
            message.attributes[key].CopyFrom(value)


class ProfileServicer(profile_service_pb2_grpc.ProfileServiceServicer):
    """ProfileService over a ProfileStore."""

    def __init__(self, store: ProfileStore, max_eligibility_batch: int) -> None:
        self.store = store
        self.max_eligibility_batch = max_eligibility_batch

    async def UpsertProfiles(
        self, request: profile_service_pb2.UpsertProfilesRequest, context: grpc.aio.ServicerContext
    ) -> profile_service_pb2.UpsertProfilesResponse:
        profiles = [profile_from_proto(p, i) for i, p in enumerate(request.profiles)]
        created, updated = await self.store.database.run(self.store.upsert_profiles, current_sandbox(), profiles)
        return profile_service_pb2.UpsertProfilesResponse(created=created, updated=updated)

    async def GetProfile(
        self, request: profile_service_pb2.GetProfileRequest, context: grpc.aio.ServicerContext
    ) -> profile_service_pb2.GetProfileResponse:
        (profile_id,) = parse_name(request.name, "profiles")
        profile = await self.store.database.run(self.store.get_profile, current_sandbox(), profile_id)
        return profile_service_pb2.GetProfileResponse(profile=profile_to_proto(profile))

    async def LookupProfile(
        self, request: profile_service_pb2.LookupProfileRequest, context: grpc.aio.ServicerContext
    ) -> profile_service_pb2.LookupProfileResponse:
        profile = await self.store.database.run(
            self.store.lookup_profile, current_sandbox(), request.identity.namespace, request.identity.value
        )
        return profile_service_pb2.LookupProfileResponse(profile=profile_to_proto(profile))

    async def DeleteProfile(
        self, request: profile_service_pb2.DeleteProfileRequest, context: grpc.aio.ServicerContext
    ) -> profile_service_pb2.DeleteProfileResponse:
        (profile_id,) = parse_name(request.name, "profiles")
        await self.store.database.run(self.store.delete_profile, current_sandbox(), profile_id)
        return profile_service_pb2.DeleteProfileResponse()

    async def ListCommunications(
        self, request: profile_service_pb2.ListCommunicationsRequest, context: grpc.aio.ServicerContext
    ) -> profile_service_pb2.ListCommunicationsResponse:
        (profile_id,) = parse_name(request.profile, "profiles", field="profile")
        size = request.page_size if 0 < request.page_size <= _MAX_PAGE else _MAX_PAGE
        page, cursor = await self.store.database.run(
            self.store.list_communications, current_sandbox(), profile_id, size, decode_cursor(request.page_token)
        )
        return profile_service_pb2.ListCommunicationsResponse(
            communications=[communication_to_proto(c) for c in page], next_page_token=encode_cursor(cursor)
        )

    async def SetConsent(
        self, request: profile_service_pb2.SetConsentRequest, context: grpc.aio.ServicerContext
    ) -> profile_service_pb2.SetConsentResponse:
        (profile_id,) = parse_name(request.profile, "profiles", field="profile")
        state = _STATE_NAMES.get(request.state, "")
        if request.state == profile_pb2.CONSENT_STATE_UNSPECIFIED:
            state = "unknown"
        profile = await self.store.database.run(
            self.store.set_consent,
            current_sandbox(),
            profile_id,
            channel_name(request.channel),
            state,
            request.source,
            request.purpose or "marketing",
        )
        return profile_service_pb2.SetConsentResponse(profile=profile_to_proto(profile))

    async def CheckEligibility(
        self, request: profile_service_pb2.CheckEligibilityRequest, context: grpc.aio.ServicerContext
    ) -> profile_service_pb2.CheckEligibilityResponse:
        if len(request.identities) > self.max_eligibility_batch:
            raise InvalidArgument(
                f"at most {self.max_eligibility_batch} identities per call",
                field="identities",
                reason="BATCH_TOO_LARGE",
            )
        if request.profile_view not in profile_service_pb2.ProfileView.values():
            raise InvalidArgument(f"unknown profile view {request.profile_view}", field="profile_view")
        results = await self.store.database.run(
            self.store.check_eligibility,
            current_sandbox(),
            channel_name(request.channel),
            category_name(request.category),
            [(i.namespace, i.value) for i in request.identities],
            reserve=request.reserve,
            message_ids=list(request.message_ids),
            create_missing=request.create_missing_profiles,
            purpose=request.purpose or "marketing",
            full_profiles=not request.omit_profiles,
            message_keys=MessageKeys(request.run, request.activity, list(request.entity_keys))
            if request.run or request.activity or request.entity_keys
            else None,
        )
        response = profile_service_pb2.CheckEligibilityResponse()
        add, with_profile = response.results.add, not request.omit_profiles
        personalization = request.profile_view == profile_service_pb2.PROFILE_VIEW_PERSONALIZATION
        times: dict[datetime, tuple[int, int]] = {}
        for result in results:
            fill_eligibility(add(), result, with_profile=with_profile, times=times, personalization=personalization)
        return response

    async def RecordCommunications(
        self, request: profile_service_pb2.RecordCommunicationsRequest, context: grpc.aio.ServicerContext
    ) -> profile_service_pb2.RecordCommunicationsResponse:
        # What the communications have in common, read once: a field a communication leaves unset (an empty
        # string, an unspecified enum, no send time) takes its value from here. (Merged value by value: no
        # communication is copied; a merged value found invalid is named as the communication's field.)
        defaults = request.defaults
        own = [
            FieldViolation(f"defaults.{name}", f"{name} is each communication's own: it has no default")
            for name in ("profile", "message_id")
            if getattr(defaults, name)
        ]
        if own:
            raise InvalidArgument("invalid defaults", violations=own, reason="INVALID_DEFAULTS")
        channel, category = channel_name(defaults.channel), category_name(defaults.category)
        campaign, run, activity = defaults.campaign, defaults.run, defaults.activity
        default_time = from_timestamp(defaults.send_time) if defaults.HasField("send_time") else None
        communications = []
        times: dict[tuple[int, int], datetime] = {}  # a batch's messages mostly share a few send times
        for i, c in enumerate(request.communications):
            send_time = default_time
            if c.HasField("send_time"):
                key = (c.send_time.seconds, c.send_time.nanos)
                send_time = times.get(key)
                if send_time is None:
                    send_time = times[key] = from_timestamp(c.send_time)
            communications.append(
                Communication(
                    message_id=c.message_id,
                    profile_id=_profile_id(c.profile, i),
                    channel=channel_name(c.channel) if c.channel else channel,
                    category=category_name(c.category) if c.category else category,
                    campaign=c.campaign or campaign,
                    run=c.run or run,
                    activity=c.activity or activity,
                    send_time=send_time,
                )
            )
        recorded = await self.store.database.run(self.store.record_communications, current_sandbox(), communications)
        return profile_service_pb2.RecordCommunicationsResponse(recorded=recorded)

    async def ReleaseReservations(
        self, request: profile_service_pb2.ReleaseReservationsRequest, context: grpc.aio.ServicerContext
    ) -> profile_service_pb2.ReleaseReservationsResponse:
        for i, message_id in enumerate(request.message_ids):
            if not message_id:
                raise InvalidArgument("message ids must be set", field=f"message_ids[{i}]")
        released = await self.store.database.run(
            self.store.release_reservations, current_sandbox(), list(request.message_ids)
        )
        return profile_service_pb2.ReleaseReservationsResponse(released=released)

    async def RecordDeliveryEvents(
        self, request: profile_service_pb2.RecordDeliveryEventsRequest, context: grpc.aio.ServicerContext
    ) -> profile_service_pb2.RecordDeliveryEventsResponse:
        if len(request.events) > self.max_eligibility_batch:
            raise InvalidArgument(
                f"at most {self.max_eligibility_batch} events per call", field="events", reason="BATCH_TOO_LARGE"
            )
        events = []
        for i, e in enumerate(request.events):
            profile_id = ""
            if e.profile:
                (profile_id,) = parse_name(e.profile, "profiles", field=f"events[{i}].profile")
            events.append(
                DeliveryEvent(
                    event_id=e.event_id,
                    channel=channel_name(e.channel),
                    kind=_EVENT_KINDS.get(e.type, ""),
                    address=e.address,
                    profile_id=profile_id,
                    source=e.source,
                    event_time=from_timestamp(e.event_time) if e.HasField("event_time") else None,
                )
            )
        applied = await self.store.database.run(self.store.record_delivery_events, current_sandbox(), events)
        return profile_service_pb2.RecordDeliveryEventsResponse(applied=applied)

    async def GetQuarantine(
        self, request: profile_service_pb2.GetQuarantineRequest, context: grpc.aio.ServicerContext
    ) -> profile_service_pb2.GetQuarantineResponse:
        state = await self.store.database.run(
            self.store.get_quarantine, current_sandbox(), channel_name(request.channel), request.address
        )
        return profile_service_pb2.GetQuarantineResponse(quarantine=quarantine_to_proto(state))

    async def ReleaseQuarantine(
        self, request: profile_service_pb2.ReleaseQuarantineRequest, context: grpc.aio.ServicerContext
    ) -> profile_service_pb2.ReleaseQuarantineResponse:
        state = await self.store.database.run(
            self.store.release_quarantine, current_sandbox(), channel_name(request.channel), request.address
        )
        return profile_service_pb2.ReleaseQuarantineResponse(quarantine=quarantine_to_proto(state))

    async def CreateCappingRule(
        self, request: profile_service_pb2.CreateCappingRuleRequest, context: grpc.aio.ServicerContext
    ) -> profile_service_pb2.CreateCappingRuleResponse:
        message = request.capping_rule
        rule = CappingRule(
            rule_id=request.capping_rule_id,
            max_messages=message.max_messages,
            period=_PERIODS.get(message.period, ""),
            channel=channel_name(message.channel),
            time_basis=_TIME_BASES.get(message.time_basis, ""),
        )
        created = await self.store.database.run(self.store.create_capping_rule, current_sandbox(), rule)
        return profile_service_pb2.CreateCappingRuleResponse(capping_rule=capping_rule_to_proto(created))

    async def ListCappingRules(
        self, request: profile_service_pb2.ListCappingRulesRequest, context: grpc.aio.ServicerContext
    ) -> profile_service_pb2.ListCappingRulesResponse:
        size = request.page_size if 0 < request.page_size <= _MAX_PAGE else _MAX_PAGE
        offset = 0
        if request.page_token:
            if not request.page_token.isdigit():
                raise InvalidArgument("malformed page token", field="page_token", reason="INVALID_PAGE_TOKEN")
            offset = int(request.page_token)
        rules = await self.store.database.run(self.store.list_capping_rules, current_sandbox())
        page = rules[offset : offset + size]
        next_token = str(offset + size) if offset + size < len(rules) else ""
        return profile_service_pb2.ListCappingRulesResponse(
            capping_rules=[capping_rule_to_proto(r) for r in page], next_page_token=next_token
        )

    async def DeleteCappingRule(
        self, request: profile_service_pb2.DeleteCappingRuleRequest, context: grpc.aio.ServicerContext
    ) -> profile_service_pb2.DeleteCappingRuleResponse:
        (rule_id,) = parse_name(request.name, "cappingRules")
        await self.store.database.run(self.store.delete_capping_rule, current_sandbox(), rule_id)
        return profile_service_pb2.DeleteCappingRuleResponse()
