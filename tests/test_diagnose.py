"""The probe's diagnosis without a device: ranking and wording on hand-made evidence.

The evidence itself is gathered from real pymodbus servers in tests/test_commission_probe.py.
"""

from __future__ import annotations

from edge.profile import get_profile
from gateway.commission.diagnose import Evidence, explained, hints, rank, word

SDM = get_profile("eastron_sdm630")  # float32 points, big-endian words


def evidence(identity: bool | None = None, shifted: dict | None = None, spoils: dict | None = None,
             **fixes: list[str]) -> Evidence:
    """fixes: cause (word_order, plus1, minus1) -> the implausible points it makes plausible (each reads 1.0)."""
    ev = Evidence(identity=identity, identity_shifted=shifted or {})
    for key, names in fixes.items():
        cause = {"word_order": "word_order", "plus1": "+1", "minus1": "-1"}[key]
        ev.fixes[cause] = dict.fromkeys(names, 1.0)
    ev.spoils.update(spoils or {})
    return ev


def test_nothing_explained_ranks_nothing() -> None:
    assert rank(Evidence()) == []


def test_a_cause_needs_two_votes_and_more_votes_than_spoils() -> None:
    assert rank(evidence(word_order=["voltage_l1"])) == []
    assert rank(evidence(word_order=["voltage_l1", "voltage_l2"])) == [["word_order"]]
    assert rank(evidence(word_order=["voltage_l1", "voltage_l2"], spoils={"word_order": 2})) == []
    assert rank(evidence(word_order=["voltage_l1", "voltage_l2", "voltage_l3"], spoils={"word_order": 2})) == \
        [["word_order"]]


def test_more_votes_minus_spoils_ranks_first() -> None:
    ev = evidence(word_order=["voltage_l1", "voltage_l2", "voltage_l3"],
                  plus1=["voltage_l1", "voltage_l2", "voltage_l3", "frequency", "power"], spoils={"+1": 1})
    assert rank(ev) == [["+1"], ["word_order"]]  # 5 - 1 = 4 against 3


def test_equal_scores_share_the_first_place_in_cause_order() -> None:
    ev = evidence(plus1=["voltage_l1", "voltage_l2"], word_order=["voltage_l1", "voltage_l2"],
                  minus1=["frequency", "power", "voltage_l3"], spoils={"-1": 1})
    assert rank(ev) == [["word_order", "+1", "-1"]]


def test_identification_as_configured_rules_out_the_shifts() -> None:
    ev = evidence(identity=True, plus1=["voltage_l1", "voltage_l2", "voltage_l3", "frequency"],
                  word_order=["voltage_l1", "voltage_l2"])
    assert rank(ev) == [["word_order"]]


def test_identification_that_only_matches_shifted_is_strong_evidence() -> None:
    ev = evidence(identity=False, shifted={"+1": False, "-1": True}, word_order=["voltage_l1", "voltage_l2"])
    assert rank(ev) == [["-1"], ["word_order"]]  # no value needs to vote: the identity moved one register
    assert rank(evidence(identity=False, shifted={"+1": False, "-1": False}, word_order=["power", "frequency"])) == \
        [["word_order"]]


def test_wording_of_one_cause_names_the_values_and_the_fix() -> None:
    ev = evidence(word_order=["voltage_l1", "voltage_l2", "voltage_l3"], spoils={"word_order": 1})
    f = word(ev, ["word_order"], SDM)
    assert f.status == "fail"
    assert f.message == ("word order looks wrong: 3 of 4 multi-register values become plausible with word_order "
                         "little (voltage_l1, voltage_l2, voltage_l3)")
    assert "set word_order: little in edge/profiles/eastron_sdm630.yaml" in f.fix
    plus = word(evidence(plus1=["frequency", "power"]), ["+1"], SDM)
    assert plus.message.startswith("address off by +1: 2 implausible values become plausible one register later "
                                   "(frequency, power)")
    assert "addressing: one_based" in plus.fix
    minus = word(evidence(minus1=["frequency", "power"]), ["-1"], SDM)
    assert minus.message.startswith("address off by -1: 2 implausible values") and "addressing: raw" in minus.fix


def test_wording_of_a_tie_gives_each_reading_to_compare_with_the_display() -> None:
    ev = evidence(word_order=["voltage_l1", "voltage_l2"], plus1=["voltage_l2", "voltage_l1"])
    ev.fixes["+1"]["voltage_l1"] = 229.5
    f = word(ev, ["word_order", "+1"], SDM)
    assert f.message == ("word order or address off by one: 2 values become plausible either way (voltage_l1 (V) "
                         "reads with word_order little: 1 or one register later: 229.5; voltage_l2 (V) reads with "
                         "word_order little: 1 or one register later: 1)")
    assert explained(ev, ["word_order", "+1"], SDM) == ["voltage_l1", "voltage_l2"]  # the profile's order


def test_every_cause_leaves_a_hint_on_the_points_it_makes_plausible() -> None:
    ev = evidence(word_order=["voltage_l1"], plus1=["voltage_l1", "frequency"])
    assert hints(ev, SDM) == {
        "voltage_l1": ["with word_order little: 1 V (plausible)", "one register later: 1 V (plausible)"],
        "frequency": ["one register later: 1 Hz (plausible)"],
    }
