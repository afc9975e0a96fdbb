"""Key material for tests: a runner's RSA key, request signers, and the folders the runner reads them from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from studio_runner.envelope import PASSPHRASE_FILE, PRIVATE_KEY_FILE


@dataclass(frozen=True)
class RunnerKey:
    """A runner's RSA key pair, its private key PEM-encrypted with ``passphrase``."""

    key: rsa.RSAPrivateKey
    passphrase: bytes

    @classmethod
    def generate(cls, passphrase: str) -> RunnerKey:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048), passphrase.encode())

    @property
    def private_pem(self) -> bytes:
        """Legacy ``RSA PRIVATE KEY`` PEM (``Proc-Type: 4,ENCRYPTED``), as ``ssh-keygen -m PEM -N`` writes it."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.BestAvailableEncryption(self.passphrase),
        )

    @property
    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
        )

    def write_encrypt_dir(self, root: Path) -> Path:
        """The ``--encrypt-dir`` layout (spec §6.1); the passphrase ends in a newline, as ``--from-file`` keeps it."""
        (root / PRIVATE_KEY_FILE).parent.mkdir(parents=True, exist_ok=True)
        (root / PRIVATE_KEY_FILE).write_bytes(self.private_pem)
        (root / PASSPHRASE_FILE).parent.mkdir(parents=True, exist_ok=True)
        (root / PASSPHRASE_FILE).write_bytes(self.passphrase + b"\n")
        return root


def new_signer() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def openssh_private(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )


def openssh_public(key: ed25519.Ed25519PrivateKey, comment: str = "experimenter@laptop") -> bytes:
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + f" {comment}\n".encode()


def write_signers(folder: Path, signers: dict[str, ed25519.Ed25519PrivateKey]) -> Path:
    """A ``--request-signatures-dir``: one public key per file, named with the queue prefix it may sign for."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, key in signers.items():
        (folder / prefix).write_bytes(openssh_public(key))
    return folder


def pem_body_lines(pem: bytes) -> list[str]:
    """The base64 lines of a PEM or OpenSSH key: any of them found somewhere means the key leaked."""
    return [
        line
        for line in pem.decode().splitlines()
        if line and not line.startswith("-----") and ":" not in line and len(line) >= 40
    ]


def message_keys_connection(
    runner: RunnerKey, signer: ed25519.Ed25519PrivateKey, *, local: bool = True
) -> str:
    """An ``AIRFLOW_CONN_<ID>`` value for a ``studio_message_keys`` connection."""
    extra = {
        "runner_public_key": runner.public_pem.decode(),
        "signing_private_key": openssh_private(signer).decode(),
    }
    if local:
        extra["runner_private_key"] = runner.private_pem.decode()
        extra["runner_private_key_passphrase"] = runner.passphrase.decode()
    return json.dumps({"conn_type": "studio_message_keys", "extra": extra})
