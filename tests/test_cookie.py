import logging
import os
import re
import socket
import string

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from helpers import is_valid_visitor_id, new_visitor_id, read_visitor_id, set_cookie_header
from koala_middleware import _cookie
from koala_middleware._cookie import (
    MAX_AGE_CAPPED_MESSAGE,
    SHARED_CACHE_SKIP_MESSAGE,
    CookieSettings,
    VisitorCookie,
    cookie_domain,
    may_set_cookie,
    normalize_host,
    top_domain,
)

VID = "0b6f5d3e-8c4a-4f1e-9b2d-7a6c5e4d3f21"
VID2 = "d4c3b2a1-1234-4abc-a987-0123456789ab"
ATTRS = "; Path=/; Max-Age=31536000; SameSite=Lax"
DEFAULT = CookieSettings()
PROPERTY = hsettings(max_examples=300, deadline=None)


URL_SAFE = frozenset(string.ascii_letters + string.digits + "_-")
NIL = "00000000-0000-0000-0000-000000000000"


def oracle_valid(value: object) -> bool:
    """Independent of the module's regex: a URL-safe token of 16 to 64 characters (UUIDs of
    any version in either case are such tokens), except the nil UUID."""
    return isinstance(value, str) and 16 <= len(value) <= 64 and set(value) <= URL_SAFE and value != NIL


# --- hosts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normalized, top",
    [
        ("app.example.com", "app.example.com", "example.com"),
        ("APP.Example.COM.", "app.example.com", "example.com"),
        ("app.example.com:8443", "app.example.com", "example.com"),
        ("example.com:", "example.com", "example.com"),
        ("example.com", "example.com", "example.com"),
        ("www.shop.example.co.uk", "www.shop.example.co.uk", "example.co.uk"),
        ("foo.github.io", "foo.github.io", "foo.github.io"),
        ("app.example.test", "app.example.test", "example.test"),
        ("app.corp.internal", "app.corp.internal", "corp.internal"),
        ("my_app.example.com", "my_app.example.com", "example.com"),
        ("münchen.example.de", "xn--mnchen-3ya.example.de", "example.de"),
        ("shop.MÜNCHEN.de:443", "shop.xn--mnchen-3ya.de", "xn--mnchen-3ya.de"),
        ("[::1]:8000", "::1", None),
        ("[::1]", "::1", None),
        ("::1", "::1", None),
        ("[2001:DB8::0:1]:443", "2001:db8::1", None),
        ("127.0.0.1:5000", "127.0.0.1", None),
        ("10.1.2.3", "10.1.2.3", None),
        ("0x7f.1", "0x7f.1", None),
        ("localhost", "localhost", None),
        ("localhost:3000", "localhost", None),
        ("intranet", "intranet", None),
        ("co.uk", "co.uk", None),
        ("com", "com", None),
        ("github.io", "github.io", None),
        ("a..b", None, None),
        (".example.com", None, None),
        ("example.com..", None, None),
        ("exa mple.com", None, None),
        ("example.com:abc", None, None),
        ("example.com:80:80", None, None),
        ("[::1]8000", None, None),
        ("[not-an-ip]", None, None),
        ("evil.com\r\nSet-Cookie: x=y", None, None),
        ("exa\x00mple.com", None, None),
        ("example.com/path", None, None),
        ("user@example.com", None, None),
        ("", None, None),
        (":8000", None, None),
        ("a" * 300, None, None),
        ("a" * 64 + ".com", None, None),
        (".".join(["a" * 63] * 4) + ".com", None, None),  # 256 chars
    ],
)
def test_hosts(raw, normalized, top):
    assert normalize_host(raw) == normalized
    assert cookie_domain(raw, DEFAULT) == top
    if normalized is not None:
        assert top_domain(normalized) == top


def test_normalize_host_longest_valid_name():
    host = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 chars
    assert normalize_host(host) == host
    assert normalize_host(host + "b") is None


@pytest.mark.parametrize("value", [None, 42, b"example.com", "x" * 100_000])
def test_normalize_host_never_raises(value):
    assert normalize_host(value) is None


@pytest.mark.parametrize("host", ["Example.com", "exa mple.com", "a..b.com", "::1", "1.2.3.4", ""])
def test_top_domain_rejects_unnormalized_or_ip(host):
    assert top_domain(host) is None


def test_public_suffix_list_built_once_without_network(monkeypatch):
    built = []
    real = _cookie.PublicSuffixList

    def counting() -> object:
        built.append(1)
        return real()

    def no_network(*args, **kwargs):
        raise AssertionError("the public suffix list must never be fetched")

    monkeypatch.setattr(_cookie, "_psl", None)
    monkeypatch.setattr(_cookie, "PublicSuffixList", counting)
    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    top_domain.cache_clear()
    try:
        assert top_domain("a.example.com") == "example.com"
        assert top_domain("b.example.org") == "example.org"
    finally:
        top_domain.cache_clear()
    assert built == [1]


def test_per_host_caches_are_bounded():
    assert top_domain.cache_info().maxsize == 1024
    assert _cookie._normalize_host.cache_info().maxsize == 1024
    assert _cookie._cookie_attributes.cache_info().maxsize == 1024


# --- visitor ids -----------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_ids_read_ahead_are_not_shared_with_a_forked_child():
    new_visitor_id()  # the parent now holds ids read ahead
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids, and leave without pytest's cleanup
        os.write(write_end, " ".join(new_visitor_id() for _ in range(10)).encode())
        os._exit(0)
    os.close(write_end)
    child = set(os.read(read_end, 4096).decode().split())
    os.close(read_end)
    os.waitpid(pid, 0)
    parent = {new_visitor_id() for _ in range(10)}
    assert len(child) == 10 and all(is_valid_visitor_id(i) for i in child)
    assert not child & parent


def test_new_visitor_id_is_valid_and_fresh():
    ids = {new_visitor_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(is_valid_visitor_id(i) for i in ids)


@pytest.mark.parametrize(
    "value, valid",
    [
        (VID, True),
        (VID2, True),
        (VID.upper(), True),  # kept exactly as written: Koala matches the string
        (VID[:8].upper() + VID[8:], True),
        (VID[:14] + "1" + VID[15:], True),  # version 1
        (VID[:19] + "c" + VID[20:], True),  # any variant: a URL-safe token
        (VID.replace("-", ""), True),
        (VID[:8] + "_" + VID[9:], True),
        ("V1StGXR8_Z5jdHi6B-myT", True),  # nanoid's default: 21 characters
        ("a" * 16, True),
        ("a" * 64, True),
        ("a" * 15, False),
        ("a" * 65, False),
        ("x" * 5000, False),
        (NIL, False),
        (NIL.replace("-", ""), True),  # 32 zeros are a token, not the nil UUID's form
        ("<script>alert(1)</script>", False),
        (VID + "\n", False),
        ("{" + VID + "}", False),
        (VID[:-1] + ".", False),
        (VID[:-1] + "\u0661", False),  # ARABIC-INDIC DIGIT ONE
        (VID[:-1] + "é", False),
        ("", False),
        (None, False),
        (b"0b6f5d3e-8c4a-4f1e-9b2d-7a6c5e4d3f21", False),
    ],
)
def test_is_valid_visitor_id(value, valid):
    assert is_valid_visitor_id(value) is valid


@given(st.uuids(), st.booleans())
@PROPERTY
def test_every_uuid_of_any_version_in_either_case_is_valid_but_nil(value, upper):
    text = str(value).upper() if upper else str(value)
    assert is_valid_visitor_id(text) is (value.int != 0)


@given(
    st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=0, max_size=80)
    | st.text(alphabet='0123456789abcdefABCDEF-_xg{}<>; ="\n\u00e9', min_size=10, max_size=70)
    | st.text(max_size=80)
)
@PROPERTY
def test_is_valid_visitor_id_matches_the_oracle(value):
    assert is_valid_visitor_id(value) is oracle_valid(value)


# --- reading the cookie ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers, expected",
    [
        ([f"ko_id={VID}"], VID),
        ([f"a=1; ko_id={VID}; b=2"], VID),
        ([f"a=1;ko_id={VID};b=2"], VID),
        ([f"a=1 ;  ko_id = {VID} ; b=2"], VID),
        ([f'ko_id="{VID}"'], VID),
        ([f'a=1; ko_id = "{VID}" '], VID),
        ([f"ko_id={VID}; ko_id={VID2}"], VID),
        ([f"ko_id={VID2}", f"ko_id={VID}"], VID2),  # several Cookie headers (HTTP/2)
        ([f"ko_id=forged; ko_id={VID2}"], VID2),
        ([f"ko_id={NIL}; ko_id={VID2}"], VID2),
        ([f"ko_id={VID}.x", f"other=1; ko_id={VID2}"], VID2),
        ([f"ko_id={VID.upper()}; ko_id={VID2}"], VID.upper()),
        ([f"ko_id={VID[:14]}1{VID[15:]}"], f"{VID[:14]}1{VID[15:]}"),  # a UUID v1, kept as written
        ([f"ko_id={VID.upper()}"], VID.upper()),
        (["ko_id=V1StGXR8_Z5jdHi6B-myT"], "V1StGXR8_Z5jdHi6B-myT"),
        ([f"ko_id={VID[:8]}%{VID[9:]}"], None),
        ([f"ko_id={VID}{VID}"], None),  # too long
        (["ko_id=" + "a" * 65], None),
        (["ko_id=" + "a" * 15], None),
        ([f"ko_id={NIL}"], None),
        ([f'ko_id="{VID}'], None),  # unbalanced quote
        ([f"ko_id='{VID}'"], None),
        ([f"xko_id={VID}"], None),  # name suffix is another cookie
        ([f"a=1; xko_id={VID}; ko_idx={VID2}"], None),
        ([f"KO_ID={VID}"], None),  # cookie names are case-sensitive
        ([f"ko_id{VID}"], None),
        ([f"xko_id={VID}; ko_id={VID2}"], VID2),
        ([f"a=1,ko_id={VID}"], None),  # "," belongs to a's value (RFC 6265bis)
        ([f"a=ko_id; b={VID}"], None),
        ([f"ko_id={VID}\r\nx"], None),
        (["a=1", "b=2"], None),
        ([], None),
        ([""], None),
        ([f"ko_id=\u00e9{VID[1:]}"], None),
    ],
)
def test_read_visitor_id(headers, expected):
    assert read_visitor_id(headers) == expected
    # The middlewares' reader (a fast path for the usual header) gives the same answer, with
    # several headers joined as the ASGI middleware joins them.
    assert VisitorCookie(DEFAULT).read("; ".join(headers) if headers else None) == expected


def test_read_visitor_id_custom_name():
    assert read_visitor_id([f"ko_id={VID}; my_id={VID2}"], name="my_id") == VID2
    assert read_visitor_id([f"ko_id={VID}"], name="my_id") is None


def test_read_visitor_id_odd_inputs():
    assert read_visitor_id(f"ko_id={VID}") == VID  # one header given as a plain string
    assert read_visitor_id(h for h in ["x=1", f"ko_id={VID}"]) == VID  # any iterable
    assert read_visitor_id([b"ko_id=" + VID.encode(), f"ko_id={VID2}"]) == VID2  # non-str skipped
    huge = "; ".join(f"ko_id=junk{i}" for i in range(50_000)) + f"; ko_id={VID}"
    assert read_visitor_id([huge]) == VID


def test_reader_memo_is_bounded_and_keeps_no_cookie_values() -> None:
    reader = VisitorCookie(DEFAULT)
    session = "session=very-secret-token"
    assert reader.read(f"{session}; ko_id={VID}") == VID
    assert reader.read(f"{session}; ko_id={VID}".encode()) == VID
    assert reader.read(f"{session}; ko_id=forged") is None  # and not remembered
    assert all(isinstance(key, int) for key in reader._seen) and {v[0] for v in reader._seen.values()} == {VID}
    for index in range(_cookie._SEEN_SIZE + 10):
        header = f"n={index}; ko_id={VID2}"
        assert reader.read(header) == VID2
        assert len(reader._seen) <= _cookie._SEEN_SIZE
    assert reader.read(f"{session}; ko_id={VID}") == VID  # forgotten, read again


# --- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, option",
    [
        ({"name": ""}, ValueError, "name"),
        ({"name": "ko id"}, ValueError, "name"),
        ({"name": "ko_id;"}, ValueError, "name"),
        ({"name": "ko=id"}, ValueError, "name"),
        ({"name": "kö_id"}, ValueError, "name"),
        ({"name": "ko_id\r\n"}, ValueError, "name"),
        ({"name": "__Host-ko_id"}, ValueError, "name"),
        ({"name": "__secure-ko_id"}, ValueError, "name"),
        ({"name": 5}, ValueError, "name"),
        ({"domain": "exa mple.com"}, ValueError, "domain"),
        ({"domain": "example.com:443"}, ValueError, "domain"),
        ({"domain": "https://example.com"}, ValueError, "domain"),
        ({"domain": ""}, ValueError, "domain"),
        ({"domain": b"example.com"}, TypeError, "domain"),
        ({"allowed_hosts": "example.com"}, TypeError, "allowed_hosts"),
        ({"allowed_hosts": ["example.com", "bad host"]}, ValueError, "allowed_hosts"),
        ({"allowed_hosts": [None]}, TypeError, "allowed_hosts"),
        ({"max_age": -1}, ValueError, "max_age"),
        ({"max_age": 0}, ValueError, "max_age"),
        ({"max_age": 1.5}, TypeError, "max_age"),
        ({"max_age": True}, TypeError, "max_age"),
        ({"secure": "yes"}, TypeError, "secure"),
        ({"samesite": "sometimes"}, ValueError, "samesite"),
        ({"samesite": None}, ValueError, "samesite"),
        ({"samesite": "none", "secure": False}, ValueError, "samesite"),
    ],
)
def test_settings_validation_names_the_option(kwargs, error, option):
    with pytest.raises(error, match=rf"\b{_cookie.KEYWORDS[option]}\b"):
        CookieSettings(**kwargs)


def test_settings_normalisation(caplog):
    s = CookieSettings(domain=".Example.COM", allowed_hosts=["App.Example.com", ".shop.example.com"], samesite="STRICT")
    assert s.domain == "example.com"
    assert s.allowed_hosts == ("app.example.com", "shop.example.com")
    assert s.samesite == "strict"
    assert CookieSettings(domain="münchen.de").domain == "xn--mnchen-3ya.de"
    assert CookieSettings(samesite="LAX") == DEFAULT
    with caplog.at_level(logging.DEBUG, logger="koala_middleware"):
        capped = CookieSettings(max_age=10 * 365 * 24 * 3600)
    assert capped.max_age == 400 * 24 * 3600
    assert [r.msg for r in caplog.records] == [MAX_AGE_CAPPED_MESSAGE]
    assert CookieSettings(max_age=400 * 24 * 3600).max_age == 400 * 24 * 3600
    with pytest.raises(AttributeError):
        s.name = "other"  # type: ignore[misc]


# --- Set-Cookie ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host, https, settings, expected",
    [
        ("app.example.com", True, DEFAULT, f"ko_id={VID}; Domain=example.com{ATTRS}; Secure"),
        ("app.example.com", False, DEFAULT, f"ko_id={VID}; Domain=example.com{ATTRS}"),
        ("APP.example.co.uk:8443", True, DEFAULT, f"ko_id={VID}; Domain=example.co.uk{ATTRS}; Secure"),
        ("localhost:8000", False, DEFAULT, f"ko_id={VID}{ATTRS}"),
        ("127.0.0.1:5000", True, DEFAULT, f"ko_id={VID}{ATTRS}; Secure"),
        ("[::1]:8000", False, DEFAULT, f"ko_id={VID}{ATTRS}"),
        (None, False, DEFAULT, f"ko_id={VID}{ATTRS}"),
        ("exa mple.com", False, DEFAULT, f"ko_id={VID}{ATTRS}"),
        ("a.example.com", False, CookieSettings(secure=True), f"ko_id={VID}; Domain=example.com{ATTRS}; Secure"),
        ("a.example.com", True, CookieSettings(secure=False), f"ko_id={VID}; Domain=example.com{ATTRS}"),
        (
            "a.example.com",
            False,
            CookieSettings(samesite="None"),
            f"ko_id={VID}; Domain=example.com; Path=/; Max-Age=31536000; SameSite=None; Secure",
        ),
        (
            "a.example.com",
            True,
            CookieSettings(name="vid", samesite="strict", max_age=60),
            f"vid={VID}; Domain=example.com; Path=/; Max-Age=60; SameSite=Strict; Secure",
        ),
        # fixed domain: used for the domain and hosts under it, host-only elsewhere
        ("a.b.example.com", False, CookieSettings(domain="b.example.com"), f"ko_id={VID}; Domain=b.example.com{ATTRS}"),
        ("b.example.com", False, CookieSettings(domain="b.example.com"), f"ko_id={VID}; Domain=b.example.com{ATTRS}"),
        ("c.example.com", False, CookieSettings(domain="b.example.com"), f"ko_id={VID}{ATTRS}"),
        ("xb.example.com", False, CookieSettings(domain="b.example.com"), f"ko_id={VID}{ATTRS}"),
        # allowed_hosts: computed top domain only for listed hosts and hosts under them
        (
            "app.example.com",
            False,
            CookieSettings(allowed_hosts=("app.example.com",)),
            f"ko_id={VID}; Domain=example.com{ATTRS}",
        ),
        (
            "x.app.example.com",
            False,
            CookieSettings(allowed_hosts=["app.example.com"]),
            f"ko_id={VID}; Domain=example.com{ATTRS}",
        ),
        ("evil.example.com", False, CookieSettings(allowed_hosts=("app.example.com",)), f"ko_id={VID}{ATTRS}"),
        ("xapp.example.com", False, CookieSettings(allowed_hosts=("app.example.com",)), f"ko_id={VID}{ATTRS}"),
        ("app.example.com", False, CookieSettings(allowed_hosts=()), f"ko_id={VID}{ATTRS}"),
    ],
)
def test_set_cookie_header(host, https, settings, expected):
    assert set_cookie_header(VID, host, https, settings) == expected
    assert set_cookie_header(VID, host, https, settings) == expected  # served from the cache
    assert "httponly" not in expected.lower() and "expires" not in expected.lower()


def test_set_cookie_header_keeps_odd_hosts_out_of_the_cache():
    _cookie._cookie_attributes.cache_clear()
    for i in range(5):  # client-controlled, oversized Host headers must not pile up as cache keys
        assert set_cookie_header(VID, f"{i}.example.com" + "a" * 1000, False, DEFAULT) == f"ko_id={VID}{ATTRS}"
    assert set_cookie_header(VID, b"example.com", False, DEFAULT) == f"ko_id={VID}{ATTRS}"  # type: ignore[arg-type]
    assert set_cookie_header(VID, ["example.com"], False, DEFAULT) == f"ko_id={VID}{ATTRS}"  # type: ignore[arg-type]
    assert _cookie._cookie_attributes.cache_info().currsize == 1


@pytest.mark.parametrize("bad", ["forged\r\nSet-Cookie: admin=1", NIL, "x" * 65, "x" * 15, VID + " "])
def test_set_cookie_header_refuses_invalid_id_without_echoing_it(bad):
    with pytest.raises(ValueError) as info:
        set_cookie_header(bad, "example.com", True, DEFAULT)
    assert bad not in str(info.value)


# --- may_set_cookie --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status, cache_control, allowed",
    [
        (200, None, True),
        (200, "", True),
        (200, "max-age=60", False),  # RFC 9111: max-age alone lets a shared cache store it
        (200, "max-age=60, private", True),
        (200, "max-age=60, no-store", True),
        (200, "no-cache", True),
        (200, "public", False),
        (200, "Public, max-age=3600", False),
        (200, "max-age=0, s-maxage=60", False),
        (200, "S-MAXAGE = 60", False),
        (200, "public, no-cache", False),
        (200, "public, private", True),
        (200, "private, public, max-age=60", True),
        (200, "public, no-store", True),
        (200, "s-maxage=60, NO-STORE", True),
        (200, "publicity=1", True),
        (200, "x-s-maxage=1", True),
        (200, 'ext="public, s-maxage=60"', True),  # quoted value, not directives
        (200, 'public, ext="a, private"', False),
        (200, 'private="set-cookie, x", public', True),
        (200, "public=", False),
        (201, "max-age=60", False),
        (200, "x-max-age=60", True),
        (304, None, False),
        (304, "private", False),
        (404, "public", False),
    ],
)
def test_may_set_cookie(status, cache_control, allowed):
    assert may_set_cookie(status, cache_control) is allowed


def test_may_set_cookie_logs_the_skip_once(monkeypatch, caplog):
    monkeypatch.setattr(_cookie, "_logged_shared_cache_skip", False)
    with caplog.at_level(logging.DEBUG, logger="koala_middleware"):
        assert may_set_cookie(200, "private") is True
        assert caplog.records == []
        assert may_set_cookie(200, "public") is False
        assert may_set_cookie(200, "s-maxage=5") is False
    assert [(r.name, r.levelno, r.msg) for r in caplog.records] == [
        ("koala_middleware", logging.DEBUG, SHARED_CACHE_SKIP_MESSAGE)
    ]


# --- properties ------------------------------------------------------------------------------

_label = st.text(alphabet=string.ascii_letters + string.digits + "-_üßé\u0130.", min_size=0, max_size=20)
HOSTS = st.one_of(
    st.text(max_size=300),
    st.builds(
        lambda labels, tld, port, brackets: (("[%s]" if brackets else "%s") % ".".join([*labels, tld])) + port,
        st.lists(_label, max_size=5),
        st.sampled_from(["com", "co.uk", "github.io", "test", "de", "1", "localhost", "COM.", ""]),
        st.sampled_from(["", ":443", ":", ":x", "::1"]),
        st.booleans(),
    ),
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]:8080"),
)
SETTINGS = st.sampled_from(
    [
        DEFAULT,
        CookieSettings(domain="example.com"),
        CookieSettings(allowed_hosts=("co.uk", "github.io", "example.com")),
        CookieSettings(secure=True, samesite="none"),
    ]
)
NAMES = st.sampled_from(["ko_id", "xko_id", "ko_idx", "KO_ID", " ko_id", "ko_id ", '"ko_id"', "a"])
VALUES = st.one_of(
    st.uuids(version=4).map(str),
    st.uuids().map(str),
    st.uuids(version=4).map(lambda u: str(u).upper()),
    st.uuids(version=4).map(lambda u: f'"{u}"'),
    st.uuids(version=4).map(lambda u: f" {u} "),
    st.builds(
        lambda u, junk, at: str(u)[:at] + junk + str(u)[at:],
        st.uuids(version=4),
        st.text(min_size=1, max_size=3),
        st.integers(0, 36),
    ),
    st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=10, max_size=70),
    st.just(NIL),
    st.text(max_size=50),
)
COOKIE_PAIRS = st.tuples(NAMES, st.sampled_from(["=", " = ", "", "=="]), VALUES)
HEADERS = st.lists(
    st.one_of(
        st.text(max_size=200),
        st.builds(
            lambda pairs, sep: sep.join(n + eq + v for n, eq, v in pairs),
            st.lists(COOKIE_PAIRS, max_size=6),
            st.sampled_from(["; ", ";", " ; ", ",", ", "]),
        ),
    ),
    max_size=4,
)
_PAIR = re.compile(r'(?:^|;)[ \t]*ko_id[ \t]*=[ \t]*("?)([^;" \t]*)\1[ \t]*(?=;|$)')  # ';' alone separates


def expected_visitor_id(headers: list[str]) -> str | None:
    """Reference reader, written differently from the module's: a regex plus uuid.UUID."""
    for header in headers:
        for match in _PAIR.finditer(header):
            if oracle_valid(match.group(2)):
                return match.group(2)
    return None


@given(HEADERS)
@PROPERTY
def test_read_visitor_id_property(headers):
    result = read_visitor_id(headers)
    assert result == expected_visitor_id(headers)
    reader = VisitorCookie(DEFAULT)
    for header in headers:  # the middlewares' reader, with its fast path, agrees too
        assert reader.read(header) == expected_visitor_id([header])
        assert reader.read(header) == expected_visitor_id([header])  # again: from its memo
        if header.isascii():  # as ASGI hands it over
            assert VisitorCookie(DEFAULT).read(header.encode()) == expected_visitor_id([header])
    assert reader.read("; ".join(headers) if headers else None) == result
    if result is not None:
        assert oracle_valid(result)
        assert any(result in header for header in headers)


@given(HOSTS, st.booleans(), SETTINGS)
@PROPERTY
def test_set_cookie_header_property(host, https, settings):
    normalized = normalize_host(host)
    assert normalized is None or re.fullmatch(r"[a-z0-9_.-]{1,253}|[0-9a-f:.]+", normalized)
    vid = new_visitor_id()
    header = set_cookie_header(vid, host, https, settings)
    assert header.isascii() and "\r" not in header and "\n" not in header and "\x00" not in header
    assert header.startswith(f"{settings.name}={vid}; ")
    secure = "; Secure" if settings.secure or https or settings.samesite == "none" else ""
    samesite = settings.samesite.capitalize()
    without_domain = f"{settings.name}={vid}; Path=/; Max-Age={settings.max_age}; SameSite={samesite}{secure}"
    domains = re.findall(r"; Domain=([^;]*)", header)
    assert re.sub(r"; Domain=[^;]*", "", header) == without_domain
    assert domains == ([cookie_domain(host, settings)] if cookie_domain(host, settings) else [])
    if domains:
        assert normalized is not None
        assert normalized == domains[0] or normalized.endswith("." + domains[0])
        assert top_domain(domains[0]) == domains[0] or settings.domain == domains[0]


@given(HEADERS, HOSTS)
@PROPERTY
def test_invalid_incoming_value_is_never_echoed(headers, host):
    junk = [v for h in headers for v in re.split(r"[;,= \t\"]", h) if len(v) >= 30 and not oracle_valid(v)]
    incoming = read_visitor_id(headers)
    vid = incoming or new_visitor_id()
    header = set_cookie_header(vid, host, False, DEFAULT)
    assert header.split(";")[0] == f"ko_id={vid}"
    assert oracle_valid(vid)
    if incoming is None:
        for value in junk:
            assert value not in header or value in host


# --- issue 15: configuration refused, the list's age --------------------------------------------


@pytest.mark.parametrize(
    "domain, problem",
    [
        ("co.uk", "a public suffix"),
        ("github.io", "a public suffix"),
        ("com", "a public suffix"),
        ("codepen.dev", "a public suffix"),
        ("127.0.0.1", "an IP address"),
        ("10.0.0.1", "an IP address"),
    ],
)
def test_cookie_domain_that_browsers_would_refuse_fails_at_configuration(domain, problem):
    with pytest.raises(ValueError, match=rf"^cookie_domain '{re.escape(domain)}' is {problem}"):
        CookieSettings(domain=domain)
    assert CookieSettings(domain="example.co.uk").domain == "example.co.uk"


def test_public_suffix_list_is_from_2026_or_later():
    """``codepen.dev`` became a public suffix in August 2026 (publicsuffixlist 1.0.2.20260821):
    with an older list the middleware would set ``Domain=codepen.dev``, which browsers refuse,
    so every visitor of ``pen.codepen.dev`` would get a new id on every request. Fails when
    the installed ``publicsuffixlist`` is older: upgrade the package (the list is its data)."""
    assert top_domain("pen.codepen.dev") == "pen.codepen.dev", "publicsuffixlist predates 2026-08: upgrade it"
    assert cookie_domain("x.pen.codepen.dev", DEFAULT) == "pen.codepen.dev"


def test_copy_settings_are_checked():
    with pytest.raises(ValueError, match="server_copy_name must differ"):
        CookieSettings(server_copy_name="ko_id")
    with pytest.raises(ValueError, match=r"^cookie_server_copy_name "):
        CookieSettings(server_copy_name="bad name")
    with pytest.raises(TypeError, match=r"^cookie_server_copy must be"):
        CookieSettings(server_copy="yes")  # type: ignore[arg-type]
    assert CookieSettings(server_copy=False, server_copy_name="ko_id").server_copy is False


@pytest.mark.parametrize(
    "header, resolved",
    [
        (f"ko_id={VID}; ko_id_server={VID}", (VID, _cookie.WRITE_NONE)),
        (f"ko_id_server={VID}; ko_id={VID}", (VID, _cookie.WRITE_NONE)),
        (f"ko_id={VID}", (VID, _cookie.WRITE_COPY)),
        (f"ko_id={VID}; ko_id_server={VID2}", (VID, _cookie.WRITE_COPY)),  # ko_id wins
        (f"ko_id={VID}; ko_id_server=<bad>", (VID, _cookie.WRITE_COPY)),
        (f"ko_id_server={VID2}", (VID2, _cookie.WRITE_ID)),
        (f"ko_id=<bad>; ko_id_server={VID2}", (VID2, _cookie.WRITE_ID)),
        ("ko_id=<bad>; ko_id_server=" + "0" * 8 + "-0000-0000-0000-" + "0" * 12, None),
        ("theme=dark", None),
    ],
)
def test_resolve_reads_ko_id_and_its_server_kept_copy(header, resolved):
    cookie = VisitorCookie(DEFAULT)
    assert cookie.resolve(header) == resolved
    assert cookie.resolve(header.encode()) == resolved  # as ASGI hands it over
    assert cookie.resolve(header) == resolved  # again, from the memo
    off = VisitorCookie(CookieSettings(server_copy=False))
    expected_off = (
        (VID, _cookie.WRITE_NONE) if header.startswith(f"ko_id={VID}") or f"; ko_id={VID}" in header else None
    )
    assert off.resolve(header) == expected_off


def test_set_cookies_per_site_memo_is_bounded_and_keeps_odd_hosts_out() -> None:
    cookie = VisitorCookie(CookieSettings())
    both = _cookie.WRITE_BOTH
    assert cookie.set_cookies(VID, both, "app.example.com", True) == [
        f"ko_id={VID}; Domain=example.com{ATTRS}; Secure",
        f"ko_id_server={VID}; Domain=example.com{ATTRS}; Secure; HttpOnly",
    ]
    assert cookie.set_cookies(VID, _cookie.WRITE_COPY, "app.example.com", False) == [
        f"ko_id_server={VID}; Domain=example.com{ATTRS}; HttpOnly"  # https is part of the key
    ]
    for i in range(_cookie._CACHE_SIZE + 10):  # client-controlled hosts: the memo stays bounded
        cookie.set_cookies(VID, both, f"h{i}.example.org", False)
    assert len(cookie._by_site) <= _cookie._CACHE_SIZE
    cookie._by_site.clear()
    oversized = "a" * 1000 + ".example.com"
    assert cookie.set_cookies(VID, _cookie.WRITE_ID, oversized, False) == [f"ko_id={VID}{ATTRS}"]
    assert cookie.set_cookies(VID, _cookie.WRITE_ID, ["example.com"], False) == [f"ko_id={VID}{ATTRS}"]  # type: ignore[arg-type]
    assert list(cookie._by_site) == [(None, False)]  # neither kept as a key: both read as no host
