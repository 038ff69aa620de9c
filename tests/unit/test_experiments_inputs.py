"""RATE_OR_CONVERSIONS:USERS parsing: a decimal point makes a rate, an integer a count."""
from __future__ import annotations

import pytest

from services.experiments.inputs import Arm, InputError, parse_arm


@pytest.mark.parametrize("text,conversions,users,why", [
    ("0.07:1062", 74, 1062, "a rate: 0.07 x 1062 = 74.34, nearest integer"),
    ("74:1062", 74, 1062, "an integer is a count"),
    ("1:50", 1, 50, "a count of one (not a rate of 100 %)"),
    ("1.0:50", 50, 50, "with a decimal point, 1.0 is a rate of 100 %"),
    ("0:10", 0, 10, "no conversions"),
    ("0.0:10", 0, 10, "a rate of zero"),
    (".5:3", 2, 3, "leading dot is a rate; 1.5 rounds half up to 2"),
    ("0.5:5", 3, 5, "2.5 rounds half up (not to even) to 3"),
    ("1.:4", 4, 4, "trailing dot is still a rate"),
    (" 74 : 1062 ", 74, 1062, "spaces around the parts are ignored"),
    ("0.0704:1062", 75, 1062, "rates with more digits: 74.76 -> 75"),
])
def test_good_inputs(text, conversions, users, why):
    assert parse_arm(text) == Arm(conversions, users), why


@pytest.mark.parametrize("text,message,why", [
    ("74", "expected RATE_OR_CONVERSIONS:USERS", "no users"),
    ("74:", "expected RATE_OR_CONVERSIONS:USERS", "empty users"),
    (":1062", "expected RATE_OR_CONVERSIONS:USERS", "empty value"),
    ("74:10.5", "USERS must be a whole number", "fractional users"),
    ("74:0", "USERS must be at least 1", "no users at all"),
    ("74:-5", "USERS must be a whole number", "negative users"),
    ("75:74", "cannot exceed users", "more conversions than users"),
    ("1.5:100", "between 0 and 1", "a rate above 1 (a percentage written as 1.5?)"),
    ("7%:100", "neither a count", "percent signs are not read"),
    ("-1:100", "neither a count", "negative count"),
    ("1e-2:100", "neither a count", "scientific notation is neither form"),
    ("nan:100", "neither a count", "not a number"),
    (".:100", "neither a count", "a lone dot"),
    ("74:1062:3", "USERS must be a whole number", "too many parts"),
])
def test_bad_inputs_say_why(text, message, why):
    with pytest.raises(InputError, match=message):
        parse_arm(text)
    assert issubclass(InputError, ValueError), "callers can catch ValueError"


def test_arms_merge_and_empty_arm_is_neutral():
    assert Arm(3, 10) + Arm(4, 20) == Arm(7, 30), "daily slices add up"
    assert Arm(0, 0).rate == 0.0, "an empty arm has rate 0, not a ZeroDivisionError"
    with pytest.raises(InputError, match="negative"):
        Arm(-1, 3)
