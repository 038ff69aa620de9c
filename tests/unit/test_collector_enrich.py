"""Collector enrichment and auth rules: user agents, IP addresses, write keys."""
from __future__ import annotations

import base64

import pytest

from services.collector.auth import Unauthorized, basic_user, check_write_key
from services.collector.ip import anonymize_ip, client_ip
from services.collector.useragent import parse_user_agent

UAS = [
    ("Chrome on Windows",
     "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/126.0 Safari/537.36", "Chrome", "Windows", "desktop", False),
    ("Safari on a Mac",
     "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/17.5 Safari/605.1.15", "Safari", "Mac OS X", "desktop", False),
    ("iPhone",
     "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
     "Gecko) Version/17.5 Mobile/15E148 Safari/604.1", "Mobile Safari", "iOS", "mobile", False),
    ("iPad",
     "Mozilla/5.0 (iPad; CPU OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/17.5 Mobile/15E148 Safari/604.1", "Mobile Safari", "iOS", "tablet", False),
    ("Android phone",
     "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/126.0 Mobile Safari/537.36", "Chrome", "Android", "mobile", False),
    ("Android tablet (no 'Mobile' token)",
     "Mozilla/5.0 (Linux; Android 14; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/126.0 Safari/537.36", "Chrome", "Android", "tablet", False),
    ("Googlebot", "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
     "Googlebot", "Other", "bot", True),
    ("headless Chrome",
     "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/126.0 "
     "Safari/537.36", "HeadlessChrome", "Linux", "bot", True),
    ("curl", "curl/8.5.0", "curl", "Other", "bot", True),
    ("empty", "", "Other", "Other", "other", False),
    ("junk", "hello", "Other", "Other", "other", False),
]


@pytest.mark.parametrize("reason,ua,browser,os,device,is_bot", UAS, ids=[u[0] for u in UAS])
def test_user_agents(reason, ua, browser, os, device, is_bot):
    assert parse_user_agent(ua) == {"browser": browser, "os": os, "device": device,
                                    "is_bot": is_bot}, reason


@pytest.mark.parametrize("ip,anonymized", [
    ("203.0.113.9", "203.0.113.0"),
    (" 10.1.2.255 ", "10.1.2.0"),
    ("2001:db8:85a3:1234:5678:8a2e:370:7334", "2001:db8:85a3::"),
    ("::ffff:203.0.113.9", "203.0.113.0"),   # IPv4-mapped IPv6: treated as the IPv4 address
    ("::1", "::"),
    ("not-an-ip", None),
    ("", None),
])
def test_anonymize_ip(ip, anonymized):
    assert anonymize_ip(ip) == anonymized


@pytest.mark.parametrize("xff,remote,trusted,ip,why", [
    (None, "198.51.100.1", 1, "198.51.100.1", "no header: the peer"),
    ("203.0.113.5", "10.0.0.2", 1, "203.0.113.5", "one load balancer: what it saw"),
    ("203.0.113.5", "198.51.100.9", 0, "198.51.100.9", "no trusted proxy: a header is not believed"),
    ("1.2.3.4, 203.0.113.5", "10.0.0.2", 1, "203.0.113.5", "a spoofed entry left of ours is ignored"),
    ("1.2.3.4, 203.0.113.5, 10.0.0.1", "10.0.0.2", 2, "203.0.113.5", "two proxies: two from the right"),
    ("203.0.113.5", "10.0.0.2", 2, "10.0.0.2", "shorter than the chain: the peer"),
    ("  ", "10.0.0.2", 1, "10.0.0.2", "blank header"),
    (None, None, 1, None, "nothing known"),
])
def test_client_ip(xff, remote, trusted, ip, why):
    assert client_ip(xff, remote, trusted) == ip, why


def basic(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:".encode()).decode()


@pytest.mark.parametrize("header,user", [(None, None), ("", None), (basic("k1"), "k1"),
                                         ("basic " + base64.b64encode(b"k1").decode(), "k1")])
def test_basic_user(header, user):
    assert basic_user(header) == user


@pytest.mark.parametrize("header,message", [
    ("Bearer xyz", "scheme 'Bearer' is not supported"),
    ("Basic %%%", "not valid Basic credentials"),
])
def test_bad_authorization_headers(header, message):
    with pytest.raises(Unauthorized, match=message):
        basic_user(header)


@pytest.mark.parametrize("header_key,body_key,outcome", [
    ("k1", None, "k1"),
    (None, "k2", "k2"),
    ("k1", "wrong", "k1"),          # the header wins
    (None, None, "no write key"),
    ("", "", "no write key"),
    ("nope", None, "unknown write key"),
    (None, 12, "unknown write key"),
])
def test_check_write_key(header_key, body_key, outcome):
    if outcome.startswith(("no ", "unknown")):
        with pytest.raises(Unauthorized, match=outcome):
            check_write_key(("k1", "k2"), header_key, body_key)
    else:
        assert check_write_key(("k1", "k2"), header_key, body_key) == outcome
