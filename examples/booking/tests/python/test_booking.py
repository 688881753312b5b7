#!/usr/bin/env python3
"""End-to-end check of the booking orchestrator's gRPC surface, from outside Rust.

The proto is not compiled: the service and its messages are discovered through
gRPC server reflection, as any generic client (grpcurl, Postman) would.

    pip install -r requirements.txt
    python3 test_booking.py --target 127.0.0.1:10000

Exits 0 when every check passes; prints `python: N passed, M failed` last.
"""

from __future__ import annotations

import argparse
import sys
import traceback
import uuid
from typing import Any, Callable

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

BOOKING_SERVICE = "pb.BookingService"
REQUEST_ID_HEADER = "x-request-id"


class CheckFailed(Exception):
    """A check's expectation did not hold."""


class ReflectedClient:
    """Calls unary methods of any service the server describes through reflection."""

    def __init__(self, channel: grpc.Channel, timeout: float) -> None:
        self._channel = channel
        self._timeout = timeout
        self._pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))

    def services(self) -> list[str]:
        """Names of the services the server advertises."""
        return list(ProtoReflectionDescriptorDatabase(self._channel).get_services())

    def call(
        self, service: str, method: str, fields: dict[str, Any], request_id: str | None
    ) -> Any:
        """Calls `service/method` with a request built from `fields`; raises grpc.RpcError."""
        try:
            descriptor = self._pool.FindServiceByName(service).methods_by_name[method]
        except KeyError as err:
            raise CheckFailed(f"reflection does not describe {service}/{method}: {err}") from err
        request_class = message_factory.GetMessageClass(descriptor.input_type)
        response_class = message_factory.GetMessageClass(descriptor.output_type)
        stub = self._channel.unary_unary(
            f"/{service}/{method}",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        metadata = [(REQUEST_ID_HEADER, request_id)] if request_id is not None else []
        return stub(request_class(**fields), metadata=metadata, timeout=self._timeout)


def new_request_id() -> str:
    return f"example-request-id-{uuid.uuid4()}"


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def expect_status(call: Callable[[], Any], code: grpc.StatusCode, mentions: str) -> None:
    """Expects `call` to fail with `code` and details naming `mentions`."""
    try:
        response = call()
    except grpc.RpcError as err:
        expect(
            err.code() == code,
            f"expected {code.name}, got {err.code().name}: {err.details()!r}",
        )
        expect(
            mentions in (err.details() or ""),
            f"expected the {code.name} details to mention {mentions!r}, got {err.details()!r}",
        )
        return
    raise CheckFailed(f"expected {code.name}, but the call succeeded with {response}")


def check_reflection_lists_booking(client: ReflectedClient) -> None:
    services = client.services()
    expect(BOOKING_SERVICE in services, f"{BOOKING_SERVICE} not among reflected services {services}")


def check_sync_booking(client: ReflectedClient) -> None:
    request_id = new_request_id()
    reply = client.call(
        BOOKING_SERVICE,
        "HandleSyncBooking",
        {"ProductID": 1, "FaultInject": False},
        request_id,
    )
    expect(reply.OrderID > 0, f"OrderID should be positive, got {reply.OrderID}")
    expect(reply.PaymentID > 0, f"PaymentID should be positive, got {reply.PaymentID}")
    expect(
        reply.RequestID == request_id,
        f"RequestID should echo {request_id!r}, got {reply.RequestID!r}",
    )
    expect(not reply.FaultInject, "FaultInject should be false")


def check_fault_inject_aborts(client: ReflectedClient) -> None:
    expect_status(
        lambda: client.call(
            BOOKING_SERVICE,
            "HandleSyncBooking",
            {"ProductID": 1, "FaultInject": True},
            new_request_id(),
        ),
        grpc.StatusCode.ABORTED,
        "CreatePayment",
    )


def check_missing_product_is_invalid(client: ReflectedClient) -> None:
    expect_status(
        lambda: client.call(
            BOOKING_SERVICE,
            "HandleSyncBooking",
            {"ProductID": 0, "FaultInject": False},
            new_request_id(),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ProductID",
    )


CHECKS: list[Callable[[ReflectedClient], None]] = [
    check_reflection_lists_booking,
    check_sync_booking,
    check_fault_inject_aborts,
    check_missing_product_is_invalid,
]


def run(checks: list[Callable[[ReflectedClient], None]], client: ReflectedClient) -> int:
    """Runs every check, prints one line each and the summary; returns the failure count."""
    passed = failed = 0
    for check in checks:
        name = check.__name__.removeprefix("check_")
        try:
            check(client)
        except CheckFailed as err:
            failed += 1
            print(f"FAIL {name}: {err}")
        except grpc.RpcError as err:
            failed += 1
            print(f"FAIL {name}: unexpected gRPC error {err.code().name}: {err.details()!r}")
        except Exception:  # noqa: BLE001 - report any crash as a failed check
            failed += 1
            print(f"FAIL {name}: crashed\n{traceback.format_exc()}")
        else:
            passed += 1
            print(f"ok   {name}")
    print(f"python: {passed} passed, {failed} failed")
    return failed


def connect(target: str, timeout: float) -> grpc.Channel:
    channel = grpc.insecure_channel(target)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        channel.close()
        print(f"error: cannot connect to {target} within {timeout}s", file=sys.stderr)
        sys.exit(2)
    return channel


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:10000", help="orchestrator gRPC host:port")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call and to connect")
    args = parser.parse_args()
    with connect(args.target, args.timeout) as channel:
        failed = run(CHECKS, ReflectedClient(channel, args.timeout))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
