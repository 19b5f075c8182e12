"""The ProfileService servicer: translates protobuf requests to ProfileStore calls and back."""

from __future__ import annotations

import grpc

from carillon.profile.v1 import profile_pb2, profile_service_pb2, profile_service_pb2_grpc
from carillon.type.v1 import value_pb2
from carillon_chassis.channels import category_name, channel_name, channel_value
from carillon_chassis.errors import InvalidArgument
from carillon_chassis.names import parse_name
from carillon_chassis.sandbox import current_sandbox
from carillon_chassis.values import from_timestamp, to_timestamp
from profile_stub.profiles import Communication, Consent, Eligibility, Profile, ProfileStore

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
        consents=[
            Consent(channel_name(c.channel), _STATE_NAMES.get(c.state, "unknown"), c.source) for c in message.consents
        ],
    )


def profile_to_proto(profile: Profile) -> profile_pb2.Profile:
    """The Profile message of a domain profile."""
    message = profile_pb2.Profile(
        name=f"profiles/{profile.profile_id}",
        identities=[value_pb2.Identity(namespace=ns, value=v) for ns, v in profile.identities],
        first_name=profile.first_name,
        last_name=profile.last_name,
        locale=profile.locale,
        time_zone=profile.time_zone,
    )
    for consent in profile.consents:
        item = message.consents.add(
            channel=channel_value(consent.channel),
            state=_STATE_VALUES.get(consent.state, profile_pb2.CONSENT_STATE_UNSPECIFIED),
            source=consent.source,
        )
        if consent.update_time:
            item.update_time.CopyFrom(to_timestamp(consent.update_time))
    if profile.create_time:
        message.create_time.CopyFrom(to_timestamp(profile.create_time))
    if profile.update_time:
        message.update_time.CopyFrom(to_timestamp(profile.update_time))
    return message


def eligibility_to_proto(result: Eligibility) -> profile_pb2.EligibilityResult:
    """The EligibilityResult message of a domain verdict."""
    message = profile_pb2.EligibilityResult(
        identity=value_pb2.Identity(namespace=result.identity[0], value=result.identity[1]),
        verdict=_VERDICTS[result.verdict],
        address=result.address,
    )
    if result.profile is not None:
        message.profile.CopyFrom(profile_to_proto(result.profile))
    return message


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

    async def SetConsent(
        self, request: profile_service_pb2.SetConsentRequest, context: grpc.aio.ServicerContext
    ) -> profile_service_pb2.SetConsentResponse:
        (profile_id,) = parse_name(request.profile, "profiles", field="profile")
        state = _STATE_NAMES.get(request.state, "")
        if request.state == profile_pb2.CONSENT_STATE_UNSPECIFIED:
            state = "unknown"
        profile = await self.store.database.run(
            self.store.set_consent, current_sandbox(), profile_id, channel_name(request.channel), state, request.source
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
        results = await self.store.database.run(
            self.store.check_eligibility,
            current_sandbox(),
            channel_name(request.channel),
            category_name(request.category),
            [(i.namespace, i.value) for i in request.identities],
        )
        return profile_service_pb2.CheckEligibilityResponse(results=[eligibility_to_proto(r) for r in results])

    async def RecordCommunications(
        self, request: profile_service_pb2.RecordCommunicationsRequest, context: grpc.aio.ServicerContext
    ) -> profile_service_pb2.RecordCommunicationsResponse:
        communications = []
        for i, c in enumerate(request.communications):
            (profile_id,) = parse_name(c.profile, "profiles", field=f"communications[{i}].profile")
            communications.append(
                Communication(
                    message_id=c.message_id,
                    profile_id=profile_id,
                    channel=channel_name(c.channel),
                    category=category_name(c.category),
                    campaign=c.campaign,
                    run=c.run,
                    activity=c.activity,
                    send_time=from_timestamp(c.send_time) if c.HasField("send_time") else None,
                )
            )
        recorded = await self.store.database.run(self.store.record_communications, current_sandbox(), communications)
        return profile_service_pb2.RecordCommunicationsResponse(recorded=recorded)
