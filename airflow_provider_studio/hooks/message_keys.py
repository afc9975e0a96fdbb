"""Keys for encrypted and signed StudioML requests, from an Airflow connection of type ``studio_message_keys``.

A request sealed for the runner's RSA key and signed with an Ed25519 key (runner spec §6) holds
its configuration and credentials in no readable form on a queue, in a pod spec or in Airflow's
database. The keys live in a connection rather than a Variable because connections are Airflow's
place for credentials: secrets backends (Vault, AWS Secrets Manager) serve them, the UI and API
mask their sensitive fields, and every value is registered with the log masker when a task reads
it. A connection id is a plain name, so no key ever passes through a rendered template field.

Extras of the connection (the UI shows them as form fields):

- ``runner_public_key``: the runner's RSA public key (PEM), requests are encrypted for it;
- ``signing_private_key``: the Ed25519 key requests are signed with (OpenSSH or PEM), whose
  public half the runners trust for the queue prefix (or, for ``studio-runner run``, at all);
- ``runner_private_key`` and ``runner_private_key_passphrase``: only for ``local`` execution
  mode, where the runner is a child of the worker and needs its decryption key on disk. Leave
  them out where experiments run in pods: there the key comes from a Kubernetes Secret and
  Airflow never holds it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow.sdk import BaseHook
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from studio_runner.envelope import (
    PASSPHRASE_FILE,
    PRIVATE_KEY_FILE,
    load_rsa_private_key,
    load_rsa_public_key,
    load_signing_private_key,
    seal,
    ssh_fingerprint,
)

LOCAL_SIGNER_NAME = "airflow"
"""File name of the signer's public key for a local ``studio-runner run``: with no queue, the runner
accepts any trusted signer, so the name (a queue prefix elsewhere) does not matter."""


class MessageKeysError(ValueError):
    """The connection's keys are missing or unusable; the message says which field to fix."""


@dataclass(frozen=True)
class RequestSealingKeys:
    """What seals requests for a runner (its RSA public key, our Ed25519 signing key), and for a local
    runner its private key: one ``studio_message_keys`` connection, parsed and checked."""

    conn_id: str
    runner_public_key: RSAPublicKey = field(repr=False)
    signing_key: Ed25519PrivateKey = field(repr=False)
    runner_private_key: bytes | None = field(default=None, repr=False)
    runner_private_key_passphrase: bytes | None = field(default=None, repr=False)

    @property
    def signer_fingerprint(self) -> str:
        """OpenSSH fingerprint of the signing key, safe to log: runners name it when they refuse."""
        return ssh_fingerprint(self.signing_key.public_key())

    def seal(self, request_json: str) -> str:
        """The request as the JSON envelope a runner opens: encrypted for it, signed by us."""
        return json.dumps(seal(request_json, self.runner_public_key, self.signing_key), separators=(",", ":"))

    @contextlib.contextmanager
    def local_runner_folders(self) -> Iterator[tuple[Path, Path]]:
        """``--encrypt-dir`` and ``--request-signatures-dir`` for a runner on this machine.

        One private folder (0700, files 0600) that is removed when the block ends, whatever happens.
        """
        if not self.runner_private_key:
            raise MessageKeysError(
                f"connection {self.conn_id!r} has no runner_private_key: local execution mode runs the "
                "runner on the worker, which needs the runner's RSA private key (and its passphrase) "
                "to decrypt the request; add them, or run in kubernetes mode"
            )
        root = Path(tempfile.mkdtemp(prefix="studio-message-keys-"))  # mode 0700
        try:
            encrypt_dir, signers_dir = root / "encrypt", root / "signers"
            _write_private(encrypt_dir / PRIVATE_KEY_FILE, self.runner_private_key)
            if self.runner_private_key_passphrase:
                _write_private(encrypt_dir / PASSPHRASE_FILE, self.runner_private_key_passphrase)
            public_line = self.signing_key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
            _write_private(signers_dir / LOCAL_SIGNER_NAME, public_line + b" airflow\n")
            yield encrypt_dir, signers_dir
        finally:
            shutil.rmtree(root, ignore_errors=True)


def _write_private(path: Path, data: bytes) -> None:
    for folder in reversed([path.parent, *path.parent.parents]):
        if not folder.exists():
            folder.mkdir(mode=0o700)  # each level private (parents=True would use the umask's mode)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class StudioMessageKeysHook(BaseHook):
    """Reads the keys that seal and sign StudioML requests from a ``studio_message_keys`` connection.

    :param message_keys_conn_id: the connection; its extras are listed in the module docstring.
    """

    conn_name_attr = "message_keys_conn_id"
    default_conn_name = "studio_message_keys_default"
    conn_type = "studio_message_keys"
    hook_name = "StudioML message keys"

    def __init__(self, message_keys_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.message_keys_conn_id = message_keys_conn_id

    def get_keys(self) -> RequestSealingKeys:
        """The connection's keys, each checked, or MessageKeysError naming the field to fix."""
        conn_id = self.message_keys_conn_id
        extra = self.get_connection(conn_id).extra_dejson

        def text(name: str, *, required: bool) -> bytes | None:
            value = extra.get(name)
            if value in (None, ""):
                if required:
                    raise MessageKeysError(f"connection {conn_id!r} has no {name!r} extra")
                return None
            if not isinstance(value, str):
                raise MessageKeysError(f"connection {conn_id!r}: {name!r} must be text (PEM or OpenSSH)")
            return value.encode()

        try:
            public_key = load_rsa_public_key(text("runner_public_key", required=True) or b"")
        except ValueError as error:
            raise MessageKeysError(f"connection {conn_id!r}: runner_public_key: {error}") from None
        try:
            signing_key = load_signing_private_key(text("signing_private_key", required=True) or b"")
        except ValueError as error:
            raise MessageKeysError(f"connection {conn_id!r}: signing_private_key: {error}") from None
        private_key = text("runner_private_key", required=False)
        passphrase = text("runner_private_key_passphrase", required=False)
        if private_key is not None:
            try:  # refused here, not by a runner that would only report "cannot load"
                load_rsa_private_key(private_key, passphrase)
            except ValueError as error:
                raise MessageKeysError(f"connection {conn_id!r}: runner_private_key: {error}") from None
        return RequestSealingKeys(conn_id, public_key, signing_key, private_key, passphrase)
