"""Which webhook targets the service may call: a ``notify.url``'s syntax, an operator's allowed hosts
(with ports), and which addresses count as internal.

Pure functions of strings and settings values, no I/O. The API checks a job's ``notify.url`` with them
at submission (``app.jobspec.webhook_url_problem``); the dispatcher (``worker/webhooks.py``) checks it
again before each delivery, resolves the host, refuses internal addresses (loopback, private,
link-local, CGNAT, multicast, reserved, and IPv6 forms that embed such an IPv4 address) unless
``LORP_WEBHOOK_ALLOWED_NETWORKS`` names them, and connects to the very address it checked.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Literal
from urllib.parse import quote, urlsplit

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
DEFAULT_PORTS = {"http": 80, "https": 443}
# Control (C0, DEL, C1), format (bidi overrides, zero-width), surrogate and separator characters.
_REFUSED_CATEGORIES = {"Cc", "Cf", "Cs", "Zs", "Zl", "Zp"}
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# A last label of digits (or 0x...) is read as an IPv4 address by some resolvers ("127.1", "0x7f.1").
_NUMERIC_LABEL = re.compile(r"^(?:[0-9]+|0x[0-9a-f]*)$")
_PATH_SAFE = "/%!$&'()*+,;=:@~-._"
_NAT64 = IPv6Network("64:ff9b::/96")


class WebhookURLError(ValueError):
    """A ``notify.url`` that is not an http(s) URL the service can call; the message says why."""


@dataclass(frozen=True)
class WebhookTarget:
    """A parsed ``notify.url``: the ASCII host (IDNA-encoded; an IP literal in its compressed form), the
    port (the scheme's default when none is given) and the request target (path and query) as sent."""

    scheme: Literal["http", "https"]
    host: str
    ip: IPAddress | None
    port: int
    explicit_port: bool
    raw_path: str

    @property
    def default_port(self) -> int:
        return DEFAULT_PORTS[self.scheme]

    @property
    def host_header(self) -> str:
        """The ``Host`` header: the URL's host (never the address connected to), with a non-default port."""
        host = f"[{self.host}]" if self.ip is not None and self.ip.version == 6 else self.host
        return host if self.port == self.default_port else f"{host}:{self.port}"


def url_text_problem(url: str) -> str | None:
    """Why ``url`` cannot even be read as a URL (control, format or whitespace characters, backslashes)."""
    for ch in url:
        if ch.isspace() or unicodedata.category(ch) in _REFUSED_CATEGORIES:
            return f"must not contain control characters or whitespace (found U+{ord(ch):04X})"
        if ch == "\\":
            return "must not contain backslashes"
    return None


def ascii_hostname(name: str) -> str:
    """``name`` as the ASCII host name sent in DNS and ``Host`` (IDNA), lower case, without a trailing dot;
    WebhookURLError when it is not a valid host name."""
    name = name[:-1] if name.endswith(".") else name
    if not name:
        raise WebhookURLError("must name a host")
    try:
        encoded = name.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise WebhookURLError(f"host {name!r} is not a valid host name") from None
    labels = encoded.split(".")
    if len(encoded) > 253 or not all(_LABEL.match(label) for label in labels):
        raise WebhookURLError(f"host {name!r} is not a valid host name (letters, digits and hyphens)")
    if _NUMERIC_LABEL.match(labels[-1]):
        raise WebhookURLError(f"host {name!r} is neither a valid IP address nor a host name")
    return encoded


def _host_and_ip(hostname: str) -> tuple[str, IPAddress | None]:
    try:
        ip = ip_address(hostname)
    except ValueError:
        return ascii_hostname(hostname), None
    if isinstance(ip, IPv6Address) and ip.scope_id:
        raise WebhookURLError("must not name an IPv6 zone")
    return ip.compressed, ip


def parse_webhook_url(url: str) -> WebhookTarget:
    """Parse a ``notify.url``; WebhookURLError (a ValueError) with the reason when it is not one."""
    problem = url_text_problem(url)
    if problem is not None:
        raise WebhookURLError(problem)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # a bad IPv6 literal, a port that is not a number in range
        raise WebhookURLError(f"is not a valid URL ({exc})") from None
    if parts.scheme not in DEFAULT_PORTS or not parts.netloc:
        raise WebhookURLError("must be an http:// or https:// URL with a host")
    if "@" in parts.netloc:
        raise WebhookURLError("must not carry credentials; the signature authenticates the service")
    if not parts.hostname:
        raise WebhookURLError("must name a host")
    if port == 0:
        raise WebhookURLError("must not name port 0")
    host, ip = _host_and_ip(parts.hostname)
    scheme: Literal["http", "https"] = "https" if parts.scheme == "https" else "http"
    raw_path = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        raw_path += "?" + quote(parts.query, safe=_PATH_SAFE + "?")
    return WebhookTarget(
        scheme=scheme,
        host=host,
        ip=ip,
        port=port or DEFAULT_PORTS[scheme],
        explicit_port=port is not None,
        raw_path=raw_path,
    )


# -- the operator's allowed hosts ------------------------------------------------------------------------


@dataclass(frozen=True)
class AllowedHost:
    """One entry of LORP_WEBHOOK_ALLOWED_HOSTS: ``host`` (the scheme's default port only), ``host:port``
    or ``host:*``; the host may be ``*.example.com`` (its subdomains, not itself) or an IP literal
    (``[::1]:8080`` for IPv6 with a port)."""

    host: str
    port: int | Literal["*"] | None

    def matches(self, target: WebhookTarget) -> bool:
        if self.port is None:
            port_ok = target.port == target.default_port
        else:
            port_ok = self.port == "*" or self.port == target.port
        if not port_ok:
            return False
        if self.host.startswith("*."):
            return target.ip is None and target.host.endswith(self.host[1:])
        return target.host == self.host


def _allowed_port(text: str, entry: str) -> int | Literal["*"]:
    if text == "*":
        return "*"
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"webhook host {entry!r}: the port must be 1 to 65535 or *")
    return int(text)


def parse_allowed_host(entry: str) -> AllowedHost:
    """Read one LORP_WEBHOOK_ALLOWED_HOSTS entry; ValueError saying what is wrong with it."""
    text = entry.strip()
    port: int | Literal["*"] | None = None
    if text.startswith("["):  # [v6] or [v6]:port
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"webhook host {entry!r}: write an IPv6 address as [addr] or [addr]:port")
        if rest:
            port = _allowed_port(rest[1:], entry)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _allowed_port(port_text, entry)
    else:  # a name, an IPv4 address, or a bare IPv6 address (default port)
        host = text
    wildcard = host.startswith("*.")
    try:
        name, _ = _host_and_ip(host[2:] if wildcard else host)
    except WebhookURLError as exc:
        raise ValueError(f"webhook host {entry!r}: {exc}") from None
    return AllowedHost(f"*.{name}" if wildcard else name, port)


def host_allowed(target: WebhookTarget, allowed: list[str]) -> bool:
    """Whether an operator's list (LORP_WEBHOOK_ALLOWED_HOSTS) allows the URL's host and port; an entry
    that does not parse (the settings refuse one at start-up) allows nothing."""
    for entry in allowed:
        try:
            if parse_allowed_host(entry).matches(target):
                return True
        except ValueError:
            continue
    return False


# -- addresses -------------------------------------------------------------------------------------------


def parse_networks(entries: list[str], *, strict: bool = True) -> list[IPNetwork]:
    """LORP_WEBHOOK_ALLOWED_NETWORKS as networks (``10.0.0.0/8``, ``fd00::/8``, a single address); an
    entry that does not parse is a ValueError, or (``strict=False``) left out: it allows nothing."""
    networks: list[IPNetwork] = []
    for entry in entries:
        try:
            networks.append(ip_network(entry.strip(), strict=False))
        except ValueError:
            if strict:
                raise
    return networks


def _embedded_ipv4(ip: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 one stands for: mapped (::ffff:a.b.c.d), 6to4 (2002::/16) or NAT64."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_internal(ip: IPAddress) -> bool:
    """Loopback, private (RFC 1918, ULA), link-local (169.254/16: cloud metadata; fe80::/10), CGNAT
    (100.64/10), unspecified, multicast, reserved, documentation, site-local, or an IPv6 form of one."""
    if isinstance(ip, IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None and address_internal(embedded):
            return True
        if ip.ipv4_mapped is not None:
            return False  # the IPv4 address it maps is all that is reached
        if ip.is_site_local:
            return True
    return (
        not ip.is_global
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def address_allowed(ip: IPAddress, networks: list[IPNetwork]) -> bool:
    """Whether a webhook may connect to ``ip``: it is not internal, or an operator's network names it."""
    forms: list[IPAddress] = [ip]
    if isinstance(ip, IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            forms.append(embedded)
    if any(form in network for form in forms for network in networks if form.version == network.version):
        return True
    return not address_internal(ip)
