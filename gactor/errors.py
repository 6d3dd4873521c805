"""Garden's error types, shared by client and server.

Every error the server reports crosses the wire as a dict (``error_to_wire``) and is
rebuilt on the client as the same class with the same fields (``error_from_wire``).
"""

from __future__ import annotations

from typing import Any


class GardenError(Exception):
    """Base of every error the API reports; ``message`` is also ``str()``."""

    type_name = ""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash((type(self), self.message))


class ContainerNotFoundError(GardenError):
    type_name = "ContainerNotFoundError"

    def __init__(self, handle: str) -> None:
        super().__init__(f"unknown handle: {handle}")
        self.handle = handle


class ProcessNotFoundError(GardenError):
    type_name = "ProcessNotFoundError"

    def __init__(self, process_id: str) -> None:
        super().__init__(f"unknown process: {process_id}")
        self.process_id = process_id


class ExecutableNotFoundError(GardenError):
    type_name = "ExecutableNotFoundError"


class ServiceUnavailableError(GardenError):
    type_name = "ServiceUnavailableError"


class UnrecoverableError(GardenError):
    type_name = "UnrecoverableError"


class ConnectionLostError(GardenError):
    """The client lost its connection to the server (never a bare transport error)."""

    type_name = "ConnectionLostError"


class ProtocolError(GardenError):
    """A peer sent a frame the protocol does not allow; the message names what was wrong."""

    type_name = "ProtocolError"


_BY_TYPE: dict[str, type[GardenError]] = {
    cls.type_name: cls
    for cls in (
        ExecutableNotFoundError,
        ServiceUnavailableError,
        UnrecoverableError,
        ConnectionLostError,
        ProtocolError,
    )
}


def error_to_wire(err: GardenError) -> dict[str, Any]:
    """Garden's five-key error object (``Type``, ``Message``, ``Handle``, ``ProcessID``, ``Binary``)."""
    return {
        "Type": err.type_name,
        "Message": err.message,
        "Handle": getattr(err, "handle", ""),
        "ProcessID": getattr(err, "process_id", ""),
        "Binary": "",
    }


def error_from_wire(obj: Any) -> GardenError:
    """Rebuild the typed error; anything unrecognised becomes a plain GardenError."""
    if not isinstance(obj, dict):
        return GardenError(f"malformed error from server: {obj!r}")
    type_name = obj.get("Type") or ""
    message = str(obj.get("Message") or "")
    if type_name == ContainerNotFoundError.type_name:
        return ContainerNotFoundError(str(obj.get("Handle") or ""))
    if type_name == ProcessNotFoundError.type_name:
        return ProcessNotFoundError(str(obj.get("ProcessID") or ""))
    cls = _BY_TYPE.get(type_name, GardenError)
    return cls(message)
