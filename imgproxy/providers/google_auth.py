"""Vertex AI credentials: a service-account JSON file turned into an OAuth access token by the
JWT-bearer grant (RFC 7523) against the token URI the file names, cached and refreshed before
it expires.

A small RS256 signer with `cryptography` instead of google-auth: google-auth refreshes through
its own blocking HTTP client, which would bypass the gateway's egress checks, timeouts and byte
budgets; here the token request goes through `Upstream` like every other provider call."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ..config import ProviderConfig
from ..egress import BadEntry, policy_for
from ..errors import GatewayError, UpstreamError, upstream_error
from ..upstream import Upstream, UpstreamCall
from .base import log

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_SECONDS = 3600  # the longest lifetime Google accepts for the assertion
TOKEN_TIMEOUT = 30.0


@dataclass(frozen=True)
class ServiceAccount:
    client_email: str
    private_key: rsa.RSAPrivateKey
    private_key_id: str
    token_uri: str


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed_assertion(account: ServiceAccount, now: float) -> str:
    """The JWT the token endpoint exchanges for an access token (RFC 7523 section 2.1)."""
    header = {"alg": "RS256", "typ": "JWT", "kid": account.private_key_id}
    claims = {"iss": account.client_email, "scope": SCOPE, "aud": account.token_uri, "iat": int(now), "exp": int(now) + ASSERTION_SECONDS}
    signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
    signature = account.private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64url(signature)}"


class AccessTokens:
    """One provider's access token: fetched on first use, reused until `refresh_margin`
    seconds before it expires, then fetched again (one fetch at a time)."""

    def __init__(self, config: ProviderConfig, upstream: Upstream, credentials_file: str, refresh_margin: float) -> None:
        self.config = config
        self.upstream = upstream
        self.credentials_file = credentials_file
        self.refresh_margin = refresh_margin
        self.token: str | None = None
        self.expires_at = 0.0  # time.monotonic()
        self.private_key_id = ""
        self._lock = asyncio.Lock()
        self._token_config: tuple[str, ProviderConfig] | None = None  # per token URI origin

    async def get(self, call: UpstreamCall) -> str:
        async with self._lock:
            if self.token is None or time.monotonic() >= self.expires_at - self.refresh_margin:
                self.token, self.expires_at = None, 0.0
                self.token, lifetime = await self._fetch(call)
                self.expires_at = time.monotonic() + lifetime
            return self.token

    def forget(self, token: str) -> None:
        """The provider refused `token` (revoked, or the clock is off): fetch a new one next time."""
        if self.token == token:
            self.token, self.expires_at = None, 0.0

    async def _fetch(self, call: UpstreamCall) -> tuple[str, float]:
        account = await asyncio.to_thread(self._load)
        form = {"grant_type": GRANT_TYPE, "assertion": signed_assertion(account, time.time())}
        endpoint = self._endpoint(account.token_uri)
        try:
            async with self.upstream.request(call, endpoint, "POST", account.token_uri, data=form, timeout=min(call.timeout, TOKEN_TIMEOUT)) as resp:
                body = await self.upstream.read_json(resp, endpoint) if resp.content_type == "application/json" else {}
        except UpstreamError as exc:
            # No image was asked for yet: whatever broke, nothing was generated or billed.
            exc.produced_nothing = True
            raise
        if resp.status in (400, 401, 403):
            # invalid_grant and friends: the operator's service account is wrong or disabled.
            log.error("provider %s: the token endpoint refused the service account (HTTP %s)", self.config.name, resp.status)
            raise upstream_error(
                f"The provider '{self.config.name}' rejected this gateway's credentials; the operator has been told.",
                code="upstream_auth_failed", kind="auth", produced_nothing=True,
            )
        token, lifetime = body.get("access_token"), body.get("expires_in")
        if resp.status != 200 or not isinstance(token, str) or not token or type(lifetime) is not int or lifetime <= 0:
            log.warning("provider %s: the token endpoint answered HTTP %s without a usable token", self.config.name, resp.status)
            raise upstream_error(
                f"The provider '{self.config.name}' could not issue an access token.",
                code="upstream_error" if resp.status >= 500 else "upstream_bad_response",
                kind="5xx" if resp.status >= 500 else "bad_body", produced_nothing=True,
            )
        return token, float(lifetime)

    def _load(self) -> ServiceAccount:
        """The service account, read anew at each refresh (a rotated file is picked up). Errors
        name the file and the field, never its content."""
        where = f"the service-account file of provider '{self.config.name}' (options.credentials_file)"
        try:
            with open(self.credentials_file, encoding="utf-8") as handle:
                info = json.load(handle)
            key = serialization.load_pem_private_key(info["private_key"].encode(), password=None)
            if not isinstance(key, rsa.RSAPrivateKey):
                raise ValueError("not an RSA key")
            account = ServiceAccount(str(info["client_email"]), key, str(info.get("private_key_id", "")), str(info["token_uri"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("provider %s: cannot use %s: %s", self.config.name, self.credentials_file, type(exc).__name__)
            raise not_configured(self.config.name, f"{where} cannot be read as a service-account key ({type(exc).__name__})") from None
        if urlsplit(account.token_uri).scheme not in ("http", "https"):
            raise not_configured(self.config.name, f"{where} has a token_uri that is not an http(s) URL")
        self.private_key_id = account.private_key_id
        return account

    def _endpoint(self, token_uri: str) -> ProviderConfig:
        """The provider's config for calls to its token endpoint: the same timeouts and pools,
        with that endpoint's origin as the only host it may reach."""
        parts = urlsplit(token_uri)
        origin = f"{parts.scheme}://{parts.netloc}"
        if self._token_config is None or self._token_config[0] != origin:
            try:
                egress = policy_for(origin, (), None)
            except BadEntry as exc:
                raise not_configured(self.config.name, f"its token_uri cannot be used: {exc}") from None
            self._token_config = (origin, replace(self.config, base_url=origin, image_hosts=(), egress=egress))
        return self._token_config[1]


def not_configured(provider: str, why: str) -> GatewayError:
    return GatewayError(503, f"The provider '{provider}' is not configured correctly: {why}.", type="server_error", code="provider_not_configured")
