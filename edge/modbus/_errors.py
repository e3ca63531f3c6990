"""What can go wrong when reading a device; each error says which device and request."""

from __future__ import annotations

__all__ = [
    "NO_ANSWER_CODES", "SPLIT_CODES", "DeviceBackoff", "DeviceError", "LineDown", "ModbusExceptionReply",
    "ReadTimeout",
]

#: exception codes a device answers when a request asks for registers it lacks (2: illegal data
#: address), more than it will give at once (3: illegal data value), or, on some devices, any
#: register outside its map (4: device failure). DeviceReader splits a merged request on these.
SPLIT_CODES = frozenset({2, 3, 4})

#: exception codes a gateway answers for a device behind it that is absent or silent
#: (10: gateway path unavailable, 11: gateway target device failed to respond): the device is
#: treated as not answering, like a timeout.
NO_ANSWER_CODES = frozenset({10, 11})


class DeviceError(Exception):
    """A read failed. `reason` is a short, stable label used in metrics.

    `sent` is False when the request never reached the wire (device backing off, line down).
    """

    reason = "error"
    sent = True


class ReadTimeout(DeviceError):
    """The device did not answer (or answered garbage) within the line's timeout."""

    reason = "timeout"


class DeviceBackoff(ReadTimeout):
    """Not sent: the device stopped answering and is left alone until `retry_in` seconds have passed.

    A subclass of ReadTimeout because it means the same to a caller (the device is not answering);
    `reason` tells the two apart in metrics.
    """

    reason = "backoff"
    sent = False

    def __init__(self, message: str, retry_in: float, failures: int) -> None:
        super().__init__(message)
        self.retry_in = retry_in
        self.failures = failures


class LineDown(DeviceError):
    """The TCP connection or serial port is not available."""

    reason = "connection"


class ModbusExceptionReply(DeviceError):
    """The device answered with a Modbus exception (code 2: illegal address, 4: device failure...)."""

    reason = "exception"

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code
