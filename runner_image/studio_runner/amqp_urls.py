"""AMQP URLs as StudioML clients and runners are configured with, with and without the password.

The provider puts a URL without the password into pod specs and task logs and hands the password
over on its own (a Secret, a child's environment); the runner puts it back. The login and
password are percent-quoted, so any characters work in either.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit

DEFAULT_PORT = 5672
DEFAULT_TLS_PORT = 5671
MANAGEMENT_PORT_OFFSET = 10000
"""Upstream derives the management API from the AMQP port: 5672 -> 15672 (runner spec §2.2)."""


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def amqp_url(
    host: str, port: int, vhost: str, login: str, password: str | None = None, *, secure: bool = False
) -> str:
    """The URL of one broker and vhost; without ``password`` it carries the login only."""
    userinfo = quote(login, safe="") + (f":{quote(password, safe='')}" if password is not None else "")
    return f"{'amqps' if secure else 'amqp'}://{userinfo}@{host_port(host, port)}/{quote(vhost, safe='')}"


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` put in (replacing any there); ValueError when it names no user."""
    parts = urlsplit(url)
    if not parts.username:
        raise ValueError(
            f"a password needs a user in the AMQP URL, e.g. amqp://studio@host:5672/%2f, not {url!r}"
        )
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def without_userinfo(url: str) -> str:
    """``url`` without its login and password, for logs and pod specs."""
    parts = urlsplit(url)
    if parts.username is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def management_api_url(host: str, amqp_port: int, *, secure: bool = False) -> str:
    """The management API of the broker at ``host:amqp_port``: port + 10000, HTTPS beside AMQPS."""
    return f"{'https' if secure else 'http'}://{host_port(host, amqp_port + MANAGEMENT_PORT_OFFSET)}"


def management_url_for(url: str) -> str:
    """The management API beside an AMQP URL, with the same user (and password) in it."""
    parts = urlsplit(url)
    secure = parts.scheme == "amqps"
    base = management_api_url(
        parts.hostname or "localhost",
        parts.port or (DEFAULT_TLS_PORT if secure else DEFAULT_PORT),
        secure=secure,
    )
    if parts.username is None:
        return base
    scheme, _, address = base.partition("://")
    password = f":{parts.password}" if parts.password is not None else ""
    return f"{scheme}://{parts.username}{password}@{address}"
