"""The credentials of a DICOMweb destination: its `auth` table, as an Authorization header.

    basic    username + password_file (HTTP Basic, RFC 7617)
    bearer   token_file (RFC 6750)
    oauth2   token_url + client_id + client_secret_file (+ scope): the client credentials grant
             (RFC 6749 4.4), the client authenticated with HTTP Basic as the RFC requires every
             server to accept; the token is cached until shortly before it expires

Secret files are read when a request needs them and again whenever they change on disk (their
size or modification time), so a password fixed on disk works at the next attempt, without a
restart. A secret never reaches a log line, an error or the status page.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from router.config import Auth, BasicAuth, BearerAuth, OAuth2Auth

EXPIRY_MARGIN_S = 30.0  # a token is renewed this long before the server says it expires
DEFAULT_TOKEN_LIFETIME_S = 300.0  # a token endpoint that says nothing of expires_in


class AuthError(Exception):
    """The credentials cannot be had. `permanent`: fixing them takes a person (a secret file
    unreadable, the token endpoint refusing the client); else the token endpoint is unreachable."""

    def __init__(self, message: str, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class SecretFile:
    """One secret file, read again when it changes; the value without its trailing newline."""

    def __init__(self, path: Path, field: str) -> None:
        self.path = path
        self.field = field
        self._seen: tuple[int, int] | None = None
        self._value = ""
        self._lock = threading.Lock()

    def read(self) -> str:
        try:
            stat = self.path.stat()
            with self._lock:
                if self._seen != (stat.st_mtime_ns, stat.st_size):
                    self._value = self.path.read_text(encoding="utf-8").strip("\r\n")
                    self._seen = (stat.st_mtime_ns, stat.st_size)
                return self._value
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise AuthError(f"cannot read auth.{self.field} {self.path}: {why}", permanent=True) from None

    def changed(self) -> bool:
        """Whether the file differs from what was last read."""
        try:
            stat = self.path.stat()
        except OSError:
            return True
        return self._seen != (stat.st_mtime_ns, stat.st_size)


class Credentials:
    """What goes in the Authorization header of each request (None: no auth)."""

    def header(self, client: httpx.Client) -> str | None:  # noqa: ARG002 - the OAuth2 grant uses it
        return None

    def refused(self) -> bool:
        """The destination answered 401: forget what is cached. True when a new try may succeed
        at once (a token renewed), False when only a change of the secrets can help."""
        return False


class _Basic(Credentials):
    def __init__(self, auth: BasicAuth) -> None:
        self.username = auth.username
        self.password = SecretFile(auth.password_file, "password_file")

    def header(self, client: httpx.Client) -> str | None:
        pair = f"{self.username}:{self.password.read()}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


class _Bearer(Credentials):
    def __init__(self, auth: BearerAuth) -> None:
        self.token = SecretFile(auth.token_file, "token_file")

    def header(self, client: httpx.Client) -> str | None:
        token = self.token.read().strip()
        if not token or not token.isprintable():
            raise AuthError(f"auth.token_file {self.token.path} holds no usable token", permanent=True)
        return "Bearer " + token


class _ClientCredentials(Credentials):
    def __init__(self, auth: OAuth2Auth, clock: Callable[[], float]) -> None:
        self.auth = auth
        self.secret = SecretFile(auth.client_secret_file, "client_secret_file")
        self._clock = clock
        self._token = ""
        self._expires = 0.0
        self._lock = threading.Lock()

    def header(self, client: httpx.Client) -> str | None:
        with self._lock:
            if not self._token or self._clock() >= self._expires or self.secret.changed():
                self._token, lifetime = self._grant(client)
                self._expires = self._clock() + max(0.0, lifetime - EXPIRY_MARGIN_S)
            return "Bearer " + self._token

    def refused(self) -> bool:
        with self._lock:
            had, self._token = bool(self._token), ""
        return had

    def _grant(self, client: httpx.Client) -> tuple[str, float]:
        form = {"grant_type": "client_credentials"}
        if self.auth.scope:
            form["scope"] = self.auth.scope
        try:
            response = client.post(self.auth.token_url, data=form, auth=(self.auth.client_id, self.secret.read()),
                                   headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise AuthError(f"token endpoint {self.auth.token_url} unreachable: {type(exc).__name__}",
                            permanent=False) from None
        if response.status_code in (400, 401, 403):
            try:
                error = str(response.json().get("error", ""))[:64]
            except ValueError:
                error = ""
            raise AuthError(f"token endpoint {self.auth.token_url} refused the client credentials: HTTP "
                            f"{response.status_code}" + (f" {error}" if error.isprintable() and error else ""),
                            permanent=True)
        if response.status_code != 200:
            raise AuthError(f"token endpoint {self.auth.token_url} answered HTTP {response.status_code}",
                            permanent=False)
        try:
            body = response.json()
            token = body["access_token"]
            lifetime = float(body.get("expires_in") or DEFAULT_TOKEN_LIFETIME_S)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise AuthError(f"token endpoint {self.auth.token_url} answered no access_token", permanent=False) from None
        if not isinstance(token, str) or not token or not token.isprintable():
            raise AuthError(f"token endpoint {self.auth.token_url} answered no usable access_token", permanent=False)
        return token, lifetime


def credentials_for(auth: Auth | None, clock: Callable[[], float] = time.monotonic) -> Credentials:
    if isinstance(auth, BasicAuth):
        return _Basic(auth)
    if isinstance(auth, BearerAuth):
        return _Bearer(auth)
    if isinstance(auth, OAuth2Auth):
        return _ClientCredentials(auth, clock)
    return Credentials()
