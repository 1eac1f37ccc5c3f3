"""Reading google.rpc details off a failed call, for assertions."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass
class Details:
    code: grpc.StatusCode
    message: str
    reason: str = ""
    field_violations: dict[str, str] = field(default_factory=dict)
    retry_delay_s: float | None = None
    # PreconditionFailure violations: subject -> description.
    preconditions: dict[str, str] = field(default_factory=dict)


def details_of(error: grpc.RpcError) -> Details:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    result = Details(code=error.code(), message=error.details() or "")  # type: ignore[attr-defined]
    if status is None:
        return result
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            result.reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            result.field_violations.update({v.field: v.description for v in bad.field_violations})
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            result.retry_delay_s = retry.retry_delay.ToMilliseconds() / 1000
        elif detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            failure = error_details_pb2.PreconditionFailure()
            detail.Unpack(failure)
            result.preconditions.update({v.subject: v.description for v in failure.violations})
    return result
