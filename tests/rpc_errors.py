"""Helpers to read the ``google.rpc`` details of a failed call in tests."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass
class RpcFailure:
    """The code, ErrorInfo reason/domain and BadRequest field paths of a failed call."""

    code: grpc.StatusCode
    reason: str
    domain: str
    fields: list[str]


def failure_of(err: grpc.RpcError) -> RpcFailure:
    """Decode the rich status carried by ``err`` (an RpcError or AioRpcError)."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    reason = domain = ""
    fields: list[str] = []
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, domain = info.reason, info.domain
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                fields += [v.field for v in bad.field_violations]
    return RpcFailure(err.code(), reason, domain, fields)  # type: ignore[attr-defined]
