"""Modbus transports, one arbiter per physical line, and the device reader built on the read planner."""

from edge.backoff import Backoff
from edge.modbus._errors import (
    NO_ANSWER_CODES,
    SPLIT_CODES,
    DeviceBackoff,
    DeviceError,
    LineDown,
    ModbusExceptionReply,
    ReadTimeout,
)
from edge.modbus._line import LineSpec, LineStats, ModbusLine
from edge.modbus._reader import DeviceReader, ReadResult
from edge.modbus._registry import LineRegistry

__all__ = [
    "NO_ANSWER_CODES", "SPLIT_CODES", "Backoff", "DeviceBackoff", "DeviceError", "DeviceReader", "LineDown",
    "LineRegistry", "LineSpec", "LineStats", "ModbusExceptionReply", "ModbusLine", "ReadResult", "ReadTimeout",
]
