"""The profile service as delivery sees it: batch eligibility verdicts and the communication history.

:class:`EligibilityGateway` is what the pipeline needs; :class:`ProfileServiceGateway` implements it
over the ProfileService gRPC API (per batch: one ``CheckEligibility`` call, a second one with
``reserve`` for the marketing messages about to be sent, one ``ReleaseReservations`` call for those
that were not sent, one ``RecordCommunications`` call). A profile service that cannot be reached in
time is :class:`Unavailable` (``PROFILE_UNAVAILABLE``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, Protocol, cast

import grpc

from carillon.profile.v1 import profile_pb2, profile_service_pb2, profile_service_pb2_grpc
from carillon.type.v1 import channel_pb2
from carillon_chassis.channels import category_value, channel_value
from carillon_chassis.clients import call_metadata, open_channel
from carillon_chassis.errors import CarillonError, Unavailable, error_from_rpc
from carillon_chassis.values import from_value_map, to_timestamp

Identity = tuple[str, str]
"""(namespace, value) of an identity."""

_VERDICT_NAMES = {
    profile_pb2.VERDICT_ALLOWED: "allowed",
    profile_pb2.VERDICT_NO_CONSENT: "no_consent",
    profile_pb2.VERDICT_QUARANTINED: "quarantined",
    profile_pb2.VERDICT_CAPPED: "capped",
    profile_pb2.VERDICT_MISSING_ADDRESS: "missing_address",
    profile_pb2.VERDICT_UNKNOWN_PROFILE: "unknown_profile",
}
# Codes that mean "the profile service is not able to answer now", as opposed to a refusal.
_UNAVAILABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


@dataclass(slots=True)
class ProfileView:
    """The thin profile of a recipient, for ledger keys and personalization.

    Read-only by convention: not frozen, because a frozen dataclass's ``__init__`` sets each field with
    ``object.__setattr__``, and one view and one :class:`Verdict` are built per recipient of every batch
    (slots and a plain ``__init__``: a quarter of the cost)."""

    profile_id: str
    first_name: str = ""
    last_name: str = ""
    locale: str = ""
    time_zone: str = ""
    identities: tuple[Identity, ...] = ()
    attributes: Mapping[str, Any] = field(default_factory=dict)

    def identity(self, namespace: str) -> str:
        """The profile's first identity in ``namespace`` ("" when none)."""
        return next((value for ns, value in self.identities if ns == namespace), "")


@dataclass(slots=True)
class Verdict:
    """Whether one identity may get the message: ``allowed``, ``no_consent``, ``quarantined``,
    ``capped``, ``missing_address`` or ``unknown_profile``, with the profile and address when known.

    Read-only by convention (not frozen, as :class:`ProfileView`)."""

    identity: Identity
    verdict: str
    profile: ProfileView | None = None
    address: str = ""
    # A marketing check that reserves: whether a capping reservation holds the message's place, and
    # the message id it is held under.
    reserved: bool = False
    message_id: str = ""


@dataclass(slots=True)
class Communication:
    """One sent message, for the profile's communication history (read-only by convention, one per
    message sent: see :class:`ProfileView`)."""

    message_id: str
    profile_id: str
    channel: str
    category: str
    campaign: str
    run: str
    activity: str
    send_time: datetime


@dataclass(frozen=True)
class DeliveryEventView:
    """A delivery event for the profile service: delivered, soft_bounce, hard_bounce, complaint or
    unsubscribe, about an address (and its profile when known)."""

    event_id: str
    kind: str
    channel: str
    address: str
    profile_id: str
    event_time: datetime


_EVENT_TYPES = {
    "delivered": profile_pb2.DELIVERY_EVENT_TYPE_DELIVERED,
    "soft_bounce": profile_pb2.DELIVERY_EVENT_TYPE_SOFT_BOUNCE,
    "hard_bounce": profile_pb2.DELIVERY_EVENT_TYPE_HARD_BOUNCE,
    "complaint": profile_pb2.DELIVERY_EVENT_TYPE_COMPLAINT,
    "unsubscribe": profile_pb2.DELIVERY_EVENT_TYPE_UNSUBSCRIBE,
}
PROFILE_EVENT_KINDS = frozenset(_EVENT_TYPES)


class EligibilityGateway(Protocol):
    """The profile service operations a delivery worker needs."""

    async def check(self, sandbox: str, channel: str, category: str, identities: Sequence[Identity]) -> list[Verdict]:
        """One verdict per identity, in order."""
        ...

    async def check_and_reserve(
        self,
        sandbox: str,
        channel: str,
        identities: Sequence[Identity],
        run: str,
        activity: str,
        entity_keys: Sequence[str],
    ) -> list[Verdict]:
        """One marketing verdict per identity, in order, each allowed one also reserving one send against
        the capping rules, atomically with the check, under the message id derived from the run, the
        activity, the profile found and the identity's entity key
        (:func:`carillon_chassis.messages.message_id`); a message reserved or recorded already is
        allowed again without counting twice. The verdicts carry the profiles."""
        ...

    async def release(self, sandbox: str, message_ids: Sequence[str]) -> int:
        """Release reservations of messages that will not be sent; returns how many existed."""
        ...

    async def record(self, sandbox: str, communications: Sequence[Communication]) -> int:
        """Record sent messages (idempotent on the message id); returns how many were new."""
        ...


def _channel(name: str) -> channel_pb2.Channel.ValueType:
    return cast(channel_pb2.Channel.ValueType, channel_value(name))


def _category(name: str) -> channel_pb2.MessageCategory.ValueType:
    return cast(channel_pb2.MessageCategory.ValueType, category_value(name))


def _rpc_error(operation: str, err: grpc.RpcError) -> CarillonError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    if code in _UNAVAILABLE_CODES:
        details = err.details() if hasattr(err, "details") else str(err)
        return Unavailable(f"profile service {operation}: {code.name}: {details}", reason="PROFILE_UNAVAILABLE")
    return error_from_rpc(err)


def _add_identities(request: profile_service_pb2.CheckEligibilityRequest, identities: Sequence[Identity]) -> None:
    """Fill the request's identities in place (a message built apart and then copied in costs four times
    as much, per recipient)."""
    add = request.identities.add
    for namespace, value in identities:
        identity = add()
        identity.namespace = namespace
        identity.value = value


# The attributes of a profile without any (shared: nothing writes to a view's attributes).
_NO_ATTRIBUTES: Mapping[str, Any] = MappingProxyType({})


def _verdict(result: profile_pb2.EligibilityResult, *, with_profile: bool = True) -> Verdict:
    """The verdict of one result: each field read once from the message (one verdict per recipient)."""
    profile = None
    message = result.profile
    name = message.name
    if with_profile and name.startswith("profiles/"):
        attributes = result.attributes
        profile = ProfileView(
            name[9:],
            message.first_name,
            message.last_name,
            message.locale,
            message.time_zone,
            tuple([(i.namespace, i.value) for i in message.identities]),
            from_value_map(attributes) if attributes else _NO_ATTRIBUTES,
        )
    identity = result.identity
    return Verdict(
        (identity.namespace, identity.value),
        _VERDICT_NAMES.get(result.verdict, "unspecified"),
        profile,
        result.address,
        result.reserved,
        result.message_id,
    )


class ProfileServiceGateway:
    """The EligibilityGateway over the ProfileService gRPC API."""

    def __init__(self, target: str, *, timeout_s: float) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._channel = open_channel(target)
        self._stub = profile_service_pb2_grpc.ProfileServiceStub(self._channel)

    async def check(self, sandbox: str, channel: str, category: str, identities: Sequence[Identity]) -> list[Verdict]:
        """One CheckEligibility call for the whole batch."""
        return await self._check(sandbox, channel, category, identities, ())

    async def reserve(
        self, sandbox: str, channel: str, category: str, identities: Sequence[Identity], message_ids: Sequence[str]
    ) -> list[Verdict]:
        """One CheckEligibility call with ``reserve`` and ``omit_profiles`` for the whole batch; its verdicts
        carry no profile (the check before it returned them already, and profile_stub then loads and
        sends only what the verdicts need)."""
        return await self._check(sandbox, channel, category, identities, message_ids)

    async def check_and_reserve(
        self,
        sandbox: str,
        channel: str,
        identities: Sequence[Identity],
        run: str,
        activity: str,
        entity_keys: Sequence[str],
    ) -> list[Verdict]:
        """One marketing CheckEligibility call with ``reserve`` and ``run``, ``activity`` and
        ``entity_keys`` for the whole batch: profile_stub derives each message id and returns full
        profiles."""
        request = profile_service_pb2.CheckEligibilityRequest(
            channel=_channel(channel),
            category=_category("marketing"),
            reserve=True,
            run=run,
            activity=activity,
            entity_keys=list(entity_keys),
            profile_view=profile_service_pb2.PROFILE_VIEW_PERSONALIZATION,
        )
        return await self._call_check(sandbox, request, identities, with_profile=True)

    async def release(self, sandbox: str, message_ids: Sequence[str]) -> int:
        """One ReleaseReservations call."""
        request = profile_service_pb2.ReleaseReservationsRequest(message_ids=list(message_ids))
        try:
            response = await self._stub.ReleaseReservations(
                request, metadata=call_metadata(sandbox), timeout=self.timeout_s
            )
        except grpc.RpcError as err:
            raise _rpc_error("ReleaseReservations", err) from err
        return int(response.released)

    async def _check(
        self, sandbox: str, channel: str, category: str, identities: Sequence[Identity], message_ids: Sequence[str]
    ) -> list[Verdict]:
        request = profile_service_pb2.CheckEligibilityRequest(
            channel=_channel(channel),
            category=_category(category),
            reserve=bool(message_ids),
            message_ids=list(message_ids),
            omit_profiles=bool(message_ids),
            profile_view=profile_service_pb2.PROFILE_VIEW_PERSONALIZATION,
        )
        return await self._call_check(sandbox, request, identities, with_profile=not message_ids)

    async def _call_check(
        self,
        sandbox: str,
        request: profile_service_pb2.CheckEligibilityRequest,
        identities: Sequence[Identity],
        *,
        with_profile: bool,
    ) -> list[Verdict]:
        """Add the identities to ``request``, make the call and read one verdict per result."""
        _add_identities(request, identities)
        try:
            response = await self._stub.CheckEligibility(
                request, metadata=call_metadata(sandbox), timeout=self.timeout_s
            )
        except grpc.RpcError as err:
            raise _rpc_error("CheckEligibility", err) from err
        return [_verdict(result, with_profile=with_profile) for result in response.results]

    async def record(self, sandbox: str, communications: Sequence[Communication]) -> int:
        """One RecordCommunications call for the whole batch."""
        request = profile_service_pb2.RecordCommunicationsRequest()
        add = request.communications.add
        keys = {(c.channel, c.category, c.campaign, c.run, c.activity, c.send_time) for c in communications}
        if len(keys) == 1:  # a batch's: what they share goes once, in `defaults`
            ((channel, category, campaign, run, activity, send_time),) = keys
            defaults = request.defaults
            defaults.channel = _channel(channel)
            defaults.category = _category(category)
            defaults.campaign, defaults.run, defaults.activity = campaign, run, activity
            defaults.send_time.CopyFrom(to_timestamp(send_time))
            for c in communications:
                add(profile=f"profiles/{c.profile_id}", message_id=c.message_id)
        else:
            # Communications of several sends: each carries its fields (merged from one message per send).
            shared_key: tuple[str, str, str, str, str, datetime] | None = None
            shared = profile_pb2.Communication()
            for c in communications:
                key = (c.channel, c.category, c.campaign, c.run, c.activity, c.send_time)
                if key != shared_key:
                    shared_key = key
                    shared = profile_pb2.Communication(
                        channel=_channel(c.channel),
                        category=_category(c.category),
                        campaign=c.campaign,
                        run=c.run,
                        activity=c.activity,
                        send_time=to_timestamp(c.send_time),
                    )
                add(profile=f"profiles/{c.profile_id}", message_id=c.message_id).MergeFrom(shared)
        try:
            response = await self._stub.RecordCommunications(
                request, metadata=call_metadata(sandbox), timeout=self.timeout_s
            )
        except grpc.RpcError as err:
            raise _rpc_error("RecordCommunications", err) from err
        return int(response.recorded)

    async def get_profile(self, sandbox: str, profile_id: str) -> ProfileView:
        """One profile, for previews; NOT_FOUND when it does not exist."""
        try:
            response = await self._stub.GetProfile(
                profile_service_pb2.GetProfileRequest(name=f"profiles/{profile_id}"),
                metadata=call_metadata(sandbox),
                timeout=self.timeout_s,
            )
        except grpc.RpcError as err:
            raise _rpc_error("GetProfile", err) from err
        message = response.profile
        return ProfileView(
            profile_id=profile_id,
            first_name=message.first_name,
            last_name=message.last_name,
            locale=message.locale,
            time_zone=message.time_zone,
            identities=tuple((i.namespace, i.value) for i in message.identities),
        )

    async def record_delivery_events(self, sandbox: str, events: Sequence[DeliveryEventView]) -> bool:
        """Forward delivery events (quarantine, consent) in one call; False when the profile service
        does not implement RecordDeliveryEvents (an older profile_stub)."""
        request = profile_service_pb2.RecordDeliveryEventsRequest(
            events=[
                profile_pb2.DeliveryEvent(
                    event_id=e.event_id,
                    channel=_channel(e.channel),
                    address=e.address,
                    profile=f"profiles/{e.profile_id}" if e.profile_id else "",
                    type=_EVENT_TYPES[e.kind],
                    source=f"carillon-feedback:{e.kind}",
                    event_time=to_timestamp(e.event_time),
                )
                for e in events
            ]
        )
        try:
            await self._stub.RecordDeliveryEvents(request, metadata=call_metadata(sandbox), timeout=self.timeout_s)
        except grpc.RpcError as err:
            if hasattr(err, "code") and err.code() == grpc.StatusCode.UNIMPLEMENTED:
                return False
            raise _rpc_error("RecordDeliveryEvents", err) from err
        return True

    async def opt_out(self, sandbox: str, profile_id: str, channel: str, source: str) -> None:
        """Set the profile's consent on ``channel`` to opted-out; a profile that no longer exists is
        left alone (it was forgotten)."""
        request = profile_service_pb2.SetConsentRequest(
            profile=f"profiles/{profile_id}",
            channel=_channel(channel),
            state=profile_pb2.CONSENT_STATE_OPTED_OUT,
            source=source,
        )
        try:
            await self._stub.SetConsent(request, metadata=call_metadata(sandbox), timeout=self.timeout_s)
        except grpc.RpcError as err:
            if hasattr(err, "code") and err.code() == grpc.StatusCode.NOT_FOUND:
                return
            raise _rpc_error("SetConsent", err) from err

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()
