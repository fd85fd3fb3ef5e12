"""Where imgproxy may connect: each provider's own origins, at addresses it may use.

Two checks, both per provider:
- a URL's scheme, host and port must match the provider's base_url or one of its
  `image_hosts` (redirects are never followed, so every hop is a URL checked here);
- the address connected to must be public, unless the provider is self-hosted (its base_url
  is a loopback or private address) or the config allows non-public addresses for it. The
  check is made on the DNS answers the connection will use (`CheckingResolver`), so a public
  name that resolves, or later rebinds, to 127.0.0.1 or 169.254.169.254 is refused too.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

log = logging.getLogger("imgproxy.egress")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PORTS = {"http": 80, "https": 443}

# Address kinds. Public addresses are always allowed; NEVER ones never are (connecting to
# 0.0.0.0 reaches this machine, multicast and reserved space are no provider's).
PUBLIC, PRIVATE, LOOPBACK, LINK_LOCAL, NEVER = "public", "private", "loopback", "link-local", "never"
NON_PUBLIC = frozenset({PRIVATE, LOOPBACK, LINK_LOCAL})
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")


def _unwrap(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1 on the wire
    return ip


def classify(ip: IPAddress) -> str:
    ip = _unwrap(ip)
    if ip.is_unspecified or ip.is_multicast:
        return NEVER
    if ip.is_loopback:
        return LOOPBACK
    if ip.is_link_local:  # 169.254.0.0/16 (cloud metadata), fe80::/10
        return LINK_LOCAL
    if ip.is_reserved or (ip.version == 4 and ip in _THIS_NETWORK):
        return NEVER
    if ip.is_global:
        return PUBLIC
    return PRIVATE  # RFC 1918, unique local, shared (CGNAT) and documentation ranges


def literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@dataclass(frozen=True)
class AddressPolicy:
    """Which non-public addresses one provider may connect to."""

    kinds: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    def allows(self, ip: IPAddress) -> bool:
        kind = classify(ip)
        if kind == PUBLIC:
            return True
        if kind == NEVER:
            return False
        return kind in self.kinds or any(_unwrap(ip) in network for network in self.networks)


@dataclass(frozen=True)
class Origin:
    """One allowed scheme, host and port; `host` may be `*.suffix` (any subdomain)."""

    scheme: str
    host: str
    port: int

    def matches(self, scheme: str, host: str, port: int) -> bool:
        if scheme != self.scheme or port != self.port:
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host


def parse_origin(entry: str, default_scheme: str) -> Origin:
    """`host`, `host:port`, `*.suffix`, or `scheme://host[:port]`; the port defaults to the
    scheme's, the scheme to the provider's base_url's. ValueError says what is wrong."""
    text = entry.strip()
    if "://" not in text:
        text = f"{default_scheme}://{text}"
    try:
        url = URL(text)  # the parser aiohttp uses, so both read the same host
        port = url.port
    except ValueError as exc:
        raise ValueError(f"{entry!r}: {exc}") from None
    if url.scheme not in DEFAULT_PORTS:
        raise ValueError(f"{entry!r}: the scheme must be http or https")
    if url.path not in ("", "/") or url.query_string or url.fragment or url.user is not None:
        raise ValueError(f"{entry!r}: give a host and optionally a port, not a URL with a path or credentials")
    host = (url.raw_host or "").rstrip(".")
    if not host or "*" in host.removeprefix("*."):
        raise ValueError(f"{entry!r}: not a host name (a wildcard is allowed only as a leading `*.`)")
    return Origin(url.scheme, host, port)


def _looks_numeric(host: str) -> bool:
    # A host ending in a number is an address to URL parsers and inet_aton: 2130706433,
    # 127.1, 0x7f.1 (no top-level domain is numeric).
    last = host.rpartition(".")[2]
    return last.isdigit() or (last[:2] == "0x" and all(c in "0123456789abcdef" for c in last[2:]))


class UrlRefused(ValueError):
    """A URL one provider may not request; the message says why (never the URL itself)."""


@dataclass(frozen=True)
class EgressPolicy:
    """Everything one provider may connect to."""

    base_url: str
    origins: tuple[Origin, ...]
    addresses: AddressPolicy

    def target(self, url: str) -> str | URL:
        """What to hand aiohttp for `url`: the URL itself, parsed by the same parser that
        checked it; UrlRefused when this provider may not request it."""
        if self.base_url and (url.startswith(self.base_url + "/") or url == self.base_url):
            return url  # the adapters' own calls: base_url's origin, checked when the config was read
        try:
            parsed = URL(url)
            port = parsed.port
        except ValueError:
            raise UrlRefused("not a valid URL") from None
        scheme, host = parsed.scheme, (parsed.raw_host or "").rstrip(".")
        if scheme not in DEFAULT_PORTS or not host or port is None:
            raise UrlRefused("not an http(s) URL with a host")
        if not any(origin.matches(scheme, host, port) for origin in self.origins):
            raise UrlRefused("its scheme, host and port are not among the provider's base_url and image_hosts")
        ip = literal_address(host)
        if ip is None and _looks_numeric(host):
            raise UrlRefused("a numeric host that is not a plain IP address")
        if ip is not None and not self.addresses.allows(ip):
            raise UrlRefused(f"its address is {classify(ip)} and this provider may not use such addresses")
        return parsed


class BadEntry(ValueError):
    """A provider setting the policy cannot be built from; `key` is its path under the provider."""

    def __init__(self, key: list, problem: str) -> None:
        super().__init__(problem)
        self.key = key


def policy_for(base_url: str, image_hosts, allow_private) -> EgressPolicy:
    """The policy of one provider's config; BadEntry for a setting that cannot be used.

    `allow_private`: True (any loopback, private or link-local address), a list of networks
    in CIDR notation, or False/None (only what a self-hosted base_url implies)."""
    origins: list[Origin] = []
    kinds: set[str] = set()
    default_scheme = "https"
    if base_url:
        try:
            base = URL(base_url)
            default_scheme = base.scheme
            origins.append(parse_origin(str(base.origin()), default_scheme))
        except ValueError as exc:
            raise BadEntry(["base_url"], str(exc)) from None
        host = origins[0].host
        ip = literal_address(host)
        kind = classify(ip) if ip is not None else (LOOPBACK if host == "localhost" or host.endswith(".localhost") else PUBLIC)
        if kind == NEVER:
            raise BadEntry(["base_url"], f"{host} is not an address a provider can be reached at")
        if kind != PUBLIC:
            # A self-hosted provider: its neighbours are loopback and private addresses (and
            # link-local ones only when it is on one itself: that is where metadata lives).
            kinds |= {LOOPBACK, PRIVATE, kind}
    for i, entry in enumerate(image_hosts):
        try:
            origins.append(parse_origin(entry, default_scheme))
        except ValueError as exc:
            raise BadEntry(["image_hosts", i], str(exc)) from None
    networks: list[IPNetwork] = []
    if allow_private is True:
        kinds |= NON_PUBLIC
    for i, cidr in enumerate(allow_private if isinstance(allow_private, list) else ()):
        try:
            networks.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError as exc:
            raise BadEntry(["allow_private_addresses", i], f"not a network in CIDR notation: {exc}") from None
    return EgressPolicy(base_url, tuple(origins), AddressPolicy(frozenset(kinds), tuple(networks)))


class AddressRefused(OSError):
    """Raised inside the connector when no DNS answer for a host may be connected to;
    aiohttp hands it on as the `os_error` of a ClientConnectorError."""

    def __init__(self, host: str, addresses: list[str]) -> None:
        super().__init__(f"{host} resolves only to addresses this provider may not use: {', '.join(addresses)}")
        self.host, self.addresses = host, addresses


# The resolver the checks wrap (tests point it at their own answers).
system_resolver = DefaultResolver


class CheckingResolver(AbstractResolver):
    """aiohttp's resolver with every answer checked against an AddressPolicy: the connector
    connects only to answers that pass, so a check can never differ from the connection."""

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.inner = inner if inner is not None else system_resolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        answers = await self.inner.resolve(host, port, family)
        kept, refused = [], []
        for answer in answers:
            ip = literal_address(answer["host"])
            (kept if ip is not None and self.policy.allows(ip) else refused).append(answer)
        if refused:
            addresses = sorted({answer["host"] for answer in refused})
            if not kept:
                raise AddressRefused(host, addresses)
            log.warning("left out addresses of %s this provider may not use: %s", host, ", ".join(addresses))
        return kept

    async def close(self) -> None:
        await self.inner.close()
