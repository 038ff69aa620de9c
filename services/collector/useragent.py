"""User agent → browser, OS and device families, and a bot flag (context.ua).

Why `ua-parser` (with `ua-parser-builtins` and the `ua-parser-rs` accelerator):
it is the maintained Python port of uap-core, the community regex set that
Browserscope, Snowplow and Logstash use, updated monthly as a data package, so
new browsers and crawlers are recognised by upgrading a dependency rather than
by editing our code. A parse still costs 15–30 µs with the Rust resolver (and
several hundred µs with the pure-Python fallback), far too much at 50,000
events/s, but real traffic carries few distinct user agents (a handful of
browser builds per day), so an LRU cache in front makes the hot path one dict
look-up. uap-core names families but does not classify devices, so the
desktop/mobile/tablet/bot class is a short rule set over its answer plus a few
tokens of the raw string.
"""
from __future__ import annotations

import re
from functools import lru_cache

from ua_parser import parse

from schemas.clicks import UserAgent

CACHE_SIZE = 8192
MAX_UA_CHARS = 1024  # longer strings are junk or attacks; parse the start only

MOBILE_OS = {"iOS", "Android", "Windows Phone", "BlackBerry OS", "Firefox OS", "KaiOS",
             "Symbian OS", "Tizen", "HarmonyOS", "webOS", "Sailfish"}
DESKTOP_OS = {"Windows", "Mac OS X", "Linux", "Ubuntu", "Chrome OS", "Fedora", "Debian",
              "FreeBSD", "OpenBSD", "NetBSD", "Solaris", "Mint", "Arch Linux", "macOS"}
# Automated clients uap-core does not call "Spider": HTTP libraries and headless browsers.
_BOT = re.compile(r"bot\b|crawl|spider|slurp|headless|lighthouse|^curl/|^wget/|python-requests|"
                  r"python-urllib|aiohttp|go-http-client|^java/|libwww|httpclient|scrapy|"
                  r"facebookexternalhit|phantomjs|puppeteer|playwright", re.IGNORECASE)
_TABLET = re.compile(r"ipad|tablet|kindle|silk/|playbook|nexus (7|9|10)", re.IGNORECASE)
_MOBILE = re.compile(r"mobi|iphone|ipod|phone", re.IGNORECASE)

UNKNOWN: UserAgent = {"browser": "Other", "os": "Other", "device": "other", "is_bot": False}


@lru_cache(maxsize=CACHE_SIZE)
def parse_user_agent(ua: str) -> UserAgent:
    """The families of a user agent string; "Other"/"other" when unknown.

    The returned dict is shared by the cache: callers must not change it.
    """
    if not ua:
        return UNKNOWN
    ua = ua[:MAX_UA_CHARS]
    result = parse(ua).with_defaults()
    browser, os_, device_family = result.user_agent.family, result.os.family, result.device.family
    is_bot = device_family == "Spider" or _BOT.search(ua) is not None
    if is_bot:
        device = "bot"
    elif _TABLET.search(ua) or "Tablet" in device_family or (
            os_ == "Android" and "Mobile" not in ua):
        device = "tablet"
    elif os_ in MOBILE_OS or _MOBILE.search(ua):
        device = "mobile"
    elif os_ in DESKTOP_OS:
        device = "desktop"
    else:
        device = "other"
    return {"browser": browser, "os": os_, "device": device, "is_bot": is_bot}


def warm_up() -> None:
    """Load the regex set now (about 0.3 s) rather than in the first request."""
    parse("Mozilla/5.0 (X11; Linux x86_64) warm-up")
