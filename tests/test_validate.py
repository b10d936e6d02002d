"""_validate: call-site checks whose messages say how to fix the mistake."""

from __future__ import annotations

from typing import Any

import pytest

from koala_middleware._validate import (
    MAX_ITEM_BYTES,
    check_domain,
    check_email,
    check_id,
    check_name,
    encode_mapping,
)


def test_good_input_passes_normalised() -> None:
    assert check_name("Signed Up") == "Signed Up"
    assert check_email("  ada@example.com ") == "ada@example.com"
    assert check_id("u-1", "profile_id") == "u-1"
    assert check_domain("Acme.COM.") == "acme.com"
    assert encode_mapping(None, "traits") == "{}"
    assert encode_mapping({"plan": "pro", "seats": 3}, "traits") == '{"plan":"pro","seats":3}'


@pytest.mark.parametrize(
    ("check", "value", "error", "words"),
    [
        (check_name, 3, TypeError, "e.g. track"),
        (check_name, "  ", ValueError, "must not be empty"),
        (check_name, "x" * 256, ValueError, "over the limit"),
        (check_email, "ada", ValueError, "name@example.com"),
        (check_email, None, TypeError, "must be a str"),
        (lambda v: check_id(v, "profile_id"), "", ValueError, "1 to 255 printable"),
        (lambda v: check_id(v, "profile_id"), "a\nb", ValueError, "printable"),
        (check_domain, "https://acme.com/x", ValueError, "bare domain"),
        (check_domain, 1, TypeError, "account"),
    ],
)
def test_bad_input_says_how_to_fix_it(check: Any, value: object, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        check(value)


def test_encode_mapping_names_the_bad_part_and_bounds_the_size() -> None:
    with pytest.raises(TypeError, match=r"properties\['when'\]\[0\] is a value of type object"):
        encode_mapping({"when": [object()]}, "properties")
    with pytest.raises(TypeError, match="must be a dict"):
        encode_mapping(["plan"], "traits")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"over the {MAX_ITEM_BYTES}-byte limit"):
        encode_mapping({"x": "y" * MAX_ITEM_BYTES}, "traits")


def test_an_address_checked_before_is_still_checked_alike() -> None:
    # check_email remembers the hashes of addresses that passed: the answer must not change.
    import koala_middleware._validate as validate

    for _ in range(2):  # the second round answers from the remembered hashes
        assert check_email("  ada@example.com ") == "ada@example.com"
        assert check_email("ada@example.com") == "ada@example.com"
        with pytest.raises(ValueError, match="does not look like an email"):
            check_email("ada@example")
        with pytest.raises(TypeError, match="email must be a str"):
            check_email(b"ada@example.com")
    assert hash("ada@example.com") in validate._checked_emails
    assert all(type(kept) is int for kept in validate._checked_emails)  # hashes only, no address

    class Odd(str):
        def __hash__(self) -> int:  # claims a remembered address's hash
            return hash("ada@example.com")

    with pytest.raises(ValueError, match="does not look like an email"):
        check_email(Odd("not an address"))


def test_the_remembered_addresses_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import koala_middleware._validate as validate

    monkeypatch.setattr(validate, "_CHECKED_EMAILS_SIZE", 3)
    validate._checked_emails.clear()
    for index in range(10):
        check_email(f"user{index}@example.com")
        assert len(validate._checked_emails) <= 3
    assert check_email("user9@example.com") == "user9@example.com"
