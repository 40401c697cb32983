"""The shared argument checks: the message names the argument and the value."""

import pytest

from lightning_landscape.core._validation import check_optional_float, check_regex


def test_optional_float_is_none_or_a_checked_float():
    assert check_optional_float("ratio", None, minimum=1.0) is None
    assert check_optional_float("ratio", 2, minimum=1.0, strict_minimum=True) == 2.0
    with pytest.raises(ValueError, match=r"`ratio` must be > 1.0, got 1.0"):
        check_optional_float("ratio", 1.0, minimum=1.0, strict_minimum=True)
    with pytest.raises(TypeError, match=r"`ratio` must be a real number, got 'x'"):
        check_optional_float("ratio", "x")


def test_regex_passes_non_strings_and_valid_patterns_through():
    assert check_regex("params", None) is None
    assert check_regex("params", ["a", "b"]) == ["a", "b"]
    assert check_regex("params", "net\\.0") == "net\\.0"
    with pytest.raises(ValueError, match=r"`params` must be a valid regular expression, got '\(\[' \("):
        check_regex("params", "([")
