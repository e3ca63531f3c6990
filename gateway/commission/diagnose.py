"""Why a device's values are implausible: three causes weighed against what the device answers.

The causes: the wrong word order (the 32/64-bit values decoded with their registers swapped), and an
address off by one (every value read one register later, +1, or earlier, -1: a document that numbers
registers from 1 read as if from 0, or the other way round).

Three steps, each with one job:

- gather (the evidence): what was observed. Per cause, the implausible values it makes plausible
  (and what they then read) and the plausible values it spoils; whether the identification registers
  match as configured, and if not, whether they match one register off. The only step that reads
  from the device: a bounded number of neighbouring registers, through the line's arbiter.
- rank (pure): which causes the evidence supports, best first.
- word (pure): the finding's text and fix, and a hint per point.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from edge.modbus import DeviceError, LineDown, ModbusExceptionReply, ReadResult, ReadTimeout
from edge.profile import Point, Profile
from gateway.commission.common import EagerLine, Finding, decode_point, fmt_value, identify, judge

__all__ = ["CAUSES", "MAX_EXTRA_READS", "Cause", "Evidence", "NeighbourReads", "explained", "gather", "hints",
           "rank", "word"]

Cause = Literal["word_order", "+1", "-1"]
CAUSES: tuple[Cause, ...] = ("word_order", "+1", "-1")
#: plausible values whose shifted words are not already known are read at most this many times per cause
MAX_EXTRA_READS = 12

Value = float | str | None


@dataclass
class Evidence:
    """What the device showed about the causes (see the module doc)."""

    #: per cause: implausible point -> the plausible value it reads under that cause, in the probe's order
    fixes: dict[Cause, dict[str, Value]] = field(default_factory=lambda: {c: {} for c in CAUSES})
    #: per cause: how many plausible values become implausible under it
    spoils: dict[Cause, int] = field(default_factory=lambda: dict.fromkeys(CAUSES, 0))
    #: the identification registers match as configured; None when the profile has no identification
    identity: bool | None = None
    #: when they do not: whether they match one register later ("+1") or earlier ("-1")
    identity_shifted: dict[Cause, bool] = field(default_factory=dict)


class NeighbourReads:
    """Words at addresses the first read did not cover, read through the line's arbiter into the read's words.

    After one read that goes unanswered no more are sent: a device silent outside its map would cost a
    timeout for every further try.
    """

    def __init__(self, eager: EagerLine, unit_id: int, snap: ReadResult) -> None:
        self.eager = eager
        self.unit_id = unit_id
        self.snap = snap
        self.stopped = False

    def known(self, table: str, address: int, count: int) -> list[int] | None:
        words = self.snap.words.get(table, {})
        if address < 0 or not all(address + i in words for i in range(count)):
            return None
        return [words[address + i] for i in range(count)]

    async def words(self, table: str, address: int, count: int) -> list[int] | None:
        known = self.known(table, address, count)
        if known is not None or self.stopped:
            return known
        try:
            words = await self.eager.read(self.unit_id, table, address, count)
        except ModbusExceptionReply:
            self.snap.requests += 1
            return None
        except (ReadTimeout, LineDown, DeviceError):
            self.stopped = True
            return None
        self.snap.requests += 1
        t = self.snap.words.setdefault(table, {})
        for i, w in enumerate(words):
            t.setdefault(address + i, w)
        return words


_MISSING = object()


async def _value_under(cause: Cause, profile: Profile, p: Point, reads: NeighbourReads) -> object:
    """The point's value under a cause, or _MISSING when its words cannot be had."""
    snap = reads.snap
    if cause == "word_order":
        words = snap.point_words(profile, p)
        if words is None:
            return _MISSING
        return decode_point(profile, p, words, snap.raw, reverse_words=p.registers > 1)
    start = profile.wire(p) + int(cause)
    if start < 0 or start + p.registers > 65536:
        return _MISSING
    words = await reads.words(p.table, start, p.registers)
    if words is None:
        return _MISSING
    return decode_point(profile, p, words, snap.raw)


async def gather(profile: Profile, judged: Sequence[tuple[Point, str]], reads: NeighbourReads,
                 values: Mapping[str, Value]) -> Evidence | None:
    """The evidence for each cause; None when no value is implausible (nothing to explain).

    judged: every point read with its verdict (common.judge, or "error"); values: what was read.
    """
    checks = [(p, v) for p, v in judged if p.range is not None and p.numeric and p.table in ("holding", "input")
              and v not in ("error", "not_implemented")]
    if not any(v in ("out_of_range", "tiny") for _, v in checks):
        return None
    ev = Evidence()
    for cause in CAUSES:
        extra = 0
        for p, verdict in checks:
            if cause == "word_order" and (p.registers < 2 or p.type == "bitfield32"):
                continue  # one register has no word order
            bad = verdict in ("out_of_range", "tiny")
            if not bad and cause != "word_order" and reads.known(p.table, profile.wire(p) + int(cause), p.registers) is None:
                if extra >= MAX_EXTRA_READS or p.registers > 1:
                    continue
                extra += 1
            value = await _value_under(cause, profile, p, reads)
            if value is _MISSING:
                continue
            plausible = judge(p, value) == "ok"  # type: ignore[arg-type]
            if bad and plausible:
                ev.fixes[cause][p.name] = value  # type: ignore[assignment]
            elif verdict == "ok" and not plausible:
                ev.spoils[cause] += 1
    if profile.identification:
        ev.identity = bool(identify(profile, dict(values))[0])
        if not ev.identity:
            for shift in ("+1", "-1"):
                shifted: dict[str, Value] = {}
                for rule in profile.identification:
                    v = await _value_under(shift, profile, profile.by_name[rule.point], reads)
                    shifted[rule.point] = None if v is _MISSING else v  # type: ignore[assignment]
                ev.identity_shifted[shift] = bool(identify(profile, shifted)[0])
    return ev


def rank(ev: Evidence) -> list[list[Cause]]:
    """The causes the evidence supports, best first; causes with the same score share a place.

    A cause gains a vote for each implausible value it makes plausible and loses one for each plausible
    value it spoils; it is supported with at least two votes and more votes than losses. Identification
    registers that match as configured rule out the shifts (the map is where the profile says); ones
    that only match shifted are strong evidence for that shift. With float-only maps a swapped word
    order and a one-register shift both make values nearly right (the high word carries the magnitude):
    then both share the first place.
    """
    score = {c: len(ev.fixes[c]) - ev.spoils[c] for c in CAUSES}
    supported = {c for c in CAUSES if len(ev.fixes[c]) >= 2 and len(ev.fixes[c]) > ev.spoils[c]}
    if ev.identity is not None:
        for shift in ("+1", "-1"):
            if ev.identity:
                supported.discard(shift)
            elif ev.identity_shifted.get(shift):
                supported.add(shift)
                score[shift] += 100
    ranked = sorted(supported, key=lambda c: (-score[c], CAUSES.index(c)))
    return [list(group) for _, group in itertools.groupby(ranked, key=score.__getitem__)]


def _other_order(profile: Profile, p: Point) -> str:
    return "little" if profile.orders(p)[0] == "big" else "big"


def _label(cause: Cause, order: str) -> str:
    return {"word_order": f"with word_order {order}", "+1": "one register later", "-1": "one register earlier"}[cause]


def hints(ev: Evidence, profile: Profile) -> dict[str, list[str]]:
    """Per implausible point, what it reads under each cause that makes it plausible."""
    out: dict[str, list[str]] = {}
    for cause in CAUSES:
        for name, value in ev.fixes[cause].items():
            p = profile.by_name[name]
            out.setdefault(name, []).append(
                f"{_label(cause, _other_order(profile, p))}: {fmt_value(value)} {p.unit} (plausible)")
    return out


def explained(ev: Evidence, causes: Sequence[Cause], profile: Profile) -> list[str]:
    """The implausible points these causes explain, in the profile's order."""
    order = {p.name: i for i, p in enumerate(profile.points)}
    return sorted({n for c in causes for n in ev.fixes[c]}, key=order.__getitem__)


def word(ev: Evidence, causes: Sequence[Cause], profile: Profile) -> Finding:
    """The finding for the causes that share the first place (rank(ev)[0])."""
    fix_where = f"edge/profiles/{profile.id}.yaml"
    if len(causes) > 1:
        names = explained(ev, causes, profile)
        lines = []
        for name in names[:3]:
            p = profile.by_name[name]
            alts = [f"{_label(c, _other_order(profile, p))}: {fmt_value(ev.fixes[c][name])}"
                    for c in causes if name in ev.fixes[c]]
            lines.append(f"{name} ({p.unit}) reads " + " or ".join(alts))
        return Finding(
            "fail", f"word order or address off by one: {len(names)} values become plausible either way "
                    f"({'; '.join(lines)})",
            "compare these values with the device display to tell which; for the word order set word_order in "
            f"{fix_where} (or on the points); for the address set addressing (one_based for "
            "documents numbering from 1, raw for 0-based) or correct the addresses")
    cause = causes[0]
    names = list(ev.fixes[cause])
    total = len(names) + ev.spoils[cause]
    listed = ", ".join(names[:5]) + ("…" if len(names) > 5 else "")
    if cause == "word_order":
        order = "/".join(sorted({_other_order(profile, profile.by_name[n]) for n in names}))
        return Finding(
            "fail", f"word order looks wrong: {len(names)} of {total} multi-register values become plausible with "
                    f"word_order {order} ({listed})",
            f"the device sends its words in the other order than the profile says: set word_order: {order} in "
            f"{fix_where} (or on the points), or pick the profile of this exact model and "
            f"firmware; then compare one value with the device display")
    if cause == "+1":
        return Finding(
            "fail", f"address off by +1: {len(names)} implausible values become plausible one register later "
                    f"({listed}); the document probably numbers registers from 1 and the profile reads them as 0-based",
            f"in {fix_where} set addressing: one_based (or modicon for 3xxxx/4xxxx numbers), or "
            f"add 1 to the addresses; compare one value with the display afterwards")
    return Finding(
        "fail", f"address off by -1: {len(names)} implausible values become plausible one register earlier "
                f"({listed}); the document probably gives 0-based addresses and the profile treats them as 1-based",
        f"in {fix_where} set addressing: raw, or subtract 1 from the addresses; compare "
        f"one value with the display afterwards")
