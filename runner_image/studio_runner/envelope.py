"""Encrypted and signed StudioML requests (spec §6): opened here by the runner, sealed here by senders.

An envelope is ``{"message": {..., "payload": "A,B", "signature": ..., "fingerprint": ...}}`` where
``A`` is base64(RSA-OAEP-SHA256 of a fresh 32-byte key) for the runner's RSA key and ``B`` is
base64(24-byte nonce ‖ NaCl secretbox of the clear-text request JSON). The signature is Ed25519
over the exact ``payload`` text, checked with the key whose file name is the longest prefix of
the queue name. The clear-text header fields are advisory; only the sealed request counts.

The signature is checked before any RSA work, so a sender without a trusted key cannot make the
runner spend private-key operations. Every failure is a ``RequestError``: upstream requeued
signature and key failures forever, but a message that does not verify today will not verify
on the next runner either, so here it is dead-lettered (``<queue>_rejected``) with its reason and
can be re-published once the keys are fixed.

Keys live in folders mounted from Kubernetes secrets and are re-read when their content changes
(a rewrite, or the ``..data`` symlink swap of a secret update), without a restart.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import nacl.exceptions
import nacl.secret
import nacl.utils
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from .request import Request, RequestError, decode_request, is_envelope, parse_message

log = logging.getLogger(__name__)

SESSION_KEY_BYTES = 32
MIN_RSA_BITS = 2048
"""Smaller RSA keys are refused outright; 4096 bits is what upstream recommended."""
PRIVATE_KEY_FILE = Path("encryption") / "ssh-privatekey"
PASSPHRASE_FILE = Path("passphrase") / "ssh-passphrase"
_OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_SSH_ED25519 = b"ssh-ed25519"
_ED25519_SIGNATURE_BYTES = 64


class EnvelopeError(RequestError):
    """A request refused by the envelope rules; ``code`` names the rule for tests and metrics."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


# --- the hybrid scheme, shared with response-queue reports --------------------------------------
def hybrid_seal(data: bytes, public_key: RSAPublicKey) -> str:
    """``base64(RSA-OAEP-SHA256(key)) + "," + base64(nonce ‖ secretbox(data))``."""
    key = nacl.utils.random(SESSION_KEY_BYTES)
    boxed = nacl.secret.SecretBox(key).encrypt(data)  # nonce ‖ ciphertext, as upstream laid it out
    wrapped = public_key.encrypt(key, _OAEP)
    return base64.b64encode(wrapped).decode("ascii") + "," + base64.b64encode(bytes(boxed)).decode("ascii")


def hybrid_open(sealed: str, private_key: RSAPrivateKey) -> bytes:
    """The clear bytes of a ``hybrid_seal`` text, or EnvelopeError saying which part is wrong."""
    parts = sealed.split(",")
    if len(parts) != 2:
        raise EnvelopeError(
            "malformed_payload",
            f"encrypted payload has {len(parts)} comma-separated parts, not 2 (wrapped key, sealed body)",
        )
    wrapped, boxed = _b64(parts[0], "wrapped key"), _b64(parts[1], "sealed body")
    try:
        key = private_key.decrypt(wrapped, _OAEP)
    except ValueError:
        raise EnvelopeError(
            "undecryptable",
            "cannot unwrap the message key with this runner's RSA key: the request was encrypted "
            "for another runner key, or its wrapped key was altered",
        ) from None
    if len(key) != SESSION_KEY_BYTES:
        raise EnvelopeError(
            "undecryptable", f"the unwrapped message key is {len(key)} bytes, not {SESSION_KEY_BYTES}"
        )
    if len(boxed) < nacl.secret.SecretBox.NONCE_SIZE + nacl.secret.SecretBox.MACBYTES:
        raise EnvelopeError("tampered", "the sealed request body is truncated (shorter than nonce + MAC)")
    try:
        return nacl.secret.SecretBox(key).decrypt(boxed)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise EnvelopeError(
            "tampered", "the sealed request body fails authentication: it was altered or truncated"
        ) from None


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise EnvelopeError(
            "malformed_payload", f"the {what} of the encrypted payload is not base64"
        ) from None


# --- key material -------------------------------------------------------------------------------
def load_rsa_public_key(data: bytes | str) -> RSAPublicKey:
    """A PEM RSA public key: PKCS#1 ``RSA PUBLIC KEY`` (upstream's format) or ``PUBLIC KEY``."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        key = serialization.load_pem_public_key(raw)
    except (ValueError, UnsupportedAlgorithm) as error:
        raise ValueError(f"not a PEM RSA public key: {error}") from None
    if not isinstance(key, RSAPublicKey):
        raise ValueError(f"expected an RSA public key, found {type(key).__name__}")
    _check_rsa_size(key.key_size)
    return key


def load_rsa_private_key(data: bytes, passphrase: bytes | None) -> RSAPrivateKey:
    """A PEM RSA private key, possibly legacy-encrypted (``Proc-Type: 4,ENCRYPTED``) with ``passphrase``.

    The passphrase is tried as stored, then without a trailing newline (``kubectl create secret
    --from-file`` keeps one); a passphrase given for a clear key is ignored.
    """
    candidates: list[bytes | None] = [None]
    if passphrase:
        candidates = [passphrase]
        if passphrase.rstrip(b"\r\n") != passphrase:
            candidates.append(passphrase.rstrip(b"\r\n"))
    problem = "unreadable"
    for candidate in candidates:
        try:
            key = serialization.load_pem_private_key(data, candidate)
        except TypeError as error:
            if candidate is None:  # encrypted, and no passphrase file
                problem = f"{error} (no {PASSPHRASE_FILE} file)"
                continue
            try:  # a passphrase for a clear key
                key = serialization.load_pem_private_key(data, None)
            except (TypeError, ValueError, UnsupportedAlgorithm) as inner:
                problem = str(inner)
                continue
        except (ValueError, UnsupportedAlgorithm) as error:
            problem = str(error)
            continue
        if not isinstance(key, RSAPrivateKey):
            raise ValueError(f"expected an RSA private key, found {type(key).__name__}")
        _check_rsa_size(key.key_size)
        return key
    raise ValueError(f"cannot load the RSA private key: {problem}")


def _check_rsa_size(bits: int) -> None:
    if bits < MIN_RSA_BITS:
        raise ValueError(f"RSA key of {bits} bits is too small (at least {MIN_RSA_BITS}; 4096 recommended)")


def load_signing_public_key(data: bytes | str) -> Ed25519PublicKey:
    """One OpenSSH ``ssh-ed25519 AAAA... comment`` line (the first non-comment line of the file)."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines or not lines[0].startswith("ssh-ed25519 "):
        raise ValueError("expected one OpenSSH 'ssh-ed25519 ...' public key line")
    try:
        key = serialization.load_ssh_public_key(lines[0].encode())
    except (ValueError, UnsupportedAlgorithm) as error:
        raise ValueError(f"not an OpenSSH ssh-ed25519 public key: {error}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"expected an Ed25519 key, found {type(key).__name__}")
    return key


def load_signing_private_key(data: bytes | str, password: bytes | None = None) -> Ed25519PrivateKey:
    """An Ed25519 private key: OpenSSH (``-----BEGIN OPENSSH PRIVATE KEY-----``) or PEM PKCS#8."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        if b"OPENSSH PRIVATE KEY" in raw:
            key = serialization.load_ssh_private_key(raw, password)
        else:
            key = serialization.load_pem_private_key(raw, password)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise ValueError(f"not an Ed25519 private key: {error}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"expected an Ed25519 private key, found {type(key).__name__}")
    return key


def ssh_fingerprint(public_key: Ed25519PublicKey) -> str:
    """OpenSSH's ``SHA256:<base64, no padding>`` of the key's wire blob, as the client writes it."""
    blob = _ssh_string(_SSH_ED25519) + _ssh_string(
        public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _ssh_string(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


def _signature_bytes(text: str) -> bytes:
    """The raw 64-byte Ed25519 signature from base64 of either the raw bytes or an SSH signature blob."""
    try:
        blob = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise EnvelopeError("bad_signature", "the signature is not base64") from None
    if len(blob) == _ED25519_SIGNATURE_BYTES:
        return blob
    # SSH wire format (paramiko's sign_ssh_data): string "ssh-ed25519", string signature
    kind, rest = _read_ssh_string(blob)
    signature, _ = _read_ssh_string(rest)
    if kind != _SSH_ED25519 or signature is None or len(signature) != _ED25519_SIGNATURE_BYTES:
        raise EnvelopeError(
            "bad_signature",
            f"the signature is {len(blob)} bytes: neither a raw Ed25519 signature (64) nor an "
            "SSH 'ssh-ed25519' signature blob",
        )
    return signature


def _read_ssh_string(data: bytes | None) -> tuple[bytes | None, bytes]:
    if data is None or len(data) < 4:
        return None, b""
    length = int.from_bytes(data[:4], "big")
    if len(data) - 4 < length:
        return None, b""
    return data[4 : 4 + length], data[4 + length :]


T = TypeVar("T")


class KeyFolder(Generic[T]):
    """Key files named by queue-name prefix, one key each; re-read whenever a file's content changes.

    Content, not mtime, decides: file timestamps have coarse granularity and a Kubernetes secret
    update swaps the ``..data`` symlink rather than touching the files. Reading a few small files
    per message is cheap; parsing happens only for changed files. A file that stops parsing keeps
    its last good key (upstream did the same), a removed file drops its key.
    """

    def __init__(self, path: Path, parse: Callable[[bytes], T], what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._parse = parse
        self._lock = threading.Lock()
        self._digests: dict[str, bytes] = {}
        self._keys: dict[str, T] = {}
        self._problem: str | None = None

    def keys(self) -> dict[str, T]:
        """``{prefix: key}`` as the folder holds them now."""
        with self._lock:
            self._refresh()
            return dict(self._keys)

    def select(self, name: str) -> tuple[str, T] | None:
        """The key whose file name is the longest prefix of ``name``, with that prefix."""
        best: tuple[str, T] | None = None
        for prefix, key in self.keys().items():
            if name.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
                best = (prefix, key)
        return best

    @property
    def problem(self) -> str | None:
        """Why the folder yields no keys, when it does not (missing, unreadable, nothing parses)."""
        with self._lock:
            self._refresh()
            return self._problem if not self._keys else None

    def _refresh(self) -> None:
        try:
            names = sorted(os.listdir(self.path))
        except OSError as error:
            self._problem = f"{self.what} folder {self.path} cannot be read ({error.strerror or error})"
            if self._keys:
                log.warning("%s; its keys are dropped", self._problem)
            self._digests, self._keys = {}, {}
            return
        digests: dict[str, bytes] = {}
        contents: dict[str, bytes] = {}
        for name in names:
            if name.startswith("."):  # ..data and the timestamped folders of a mounted secret
                continue
            path = self.path / name
            try:
                if not path.is_file():
                    continue
                data = path.read_bytes()
            except OSError as error:
                log.warning("cannot read %s %s: %s", self.what, path, error.strerror or error)
                continue
            contents[name] = data
            digests[name] = hashlib.sha256(data).digest()
        if digests == self._digests:
            return
        keys: dict[str, T] = {}
        for name, data in contents.items():
            if self._digests.get(name) == digests[name] and name in self._keys:
                keys[name] = self._keys[name]
                continue
            try:
                keys[name] = self._parse(data)
            except ValueError as error:
                log.error("%s %s is not usable: %s", self.what, self.path / name, error)
                if name in self._keys:
                    keys[name] = self._keys[name]
                continue
            log.info("%s %s loaded for queue prefix %r", self.what, self.path / name, name)
        for gone in set(self._keys) - set(keys):
            log.info("%s for queue prefix %r removed from %s", self.what, gone, self.path)
        self._digests, self._keys = digests, keys
        self._problem = None if keys else f"{self.what} folder {self.path} holds no usable key"


class DecryptionKey:
    """The runner's RSA private key from ``--encrypt-dir`` (layout of spec §6.1), re-read on change."""

    def __init__(self, encrypt_dir: Path) -> None:
        self.encrypt_dir = Path(encrypt_dir)
        self._lock = threading.Lock()
        self._digest: bytes | None = None
        self._key: RSAPrivateKey | None = None
        self._problem: str | None = None

    def get(self) -> RSAPrivateKey | None:
        with self._lock:
            self._refresh()
            return self._key

    @property
    def problem(self) -> str | None:
        """Why there is no key, or why the newest files were not taken (the last good key is kept)."""
        with self._lock:
            self._refresh()
            return self._problem

    def _refresh(self) -> None:
        key_path = self.encrypt_dir / PRIVATE_KEY_FILE
        try:
            key_pem = key_path.read_bytes()
        except OSError as error:
            self._digest, self._key = None, None
            self._problem = f"no readable RSA private key at {key_path} ({error.strerror or error})"
            return
        try:
            passphrase: bytes | None = (self.encrypt_dir / PASSPHRASE_FILE).read_bytes()
        except OSError:
            passphrase = None
        digest = hashlib.sha256(key_pem + b"\0" + (passphrase or b"")).digest()
        if digest == self._digest:
            return
        self._digest = digest
        try:
            key = load_rsa_private_key(key_pem, passphrase)
        except ValueError as error:
            kept = "; the previous key stays in use" if self._key is not None else ""
            self._problem = f"{key_path}: {error}{kept}"
            log.error("RSA private key %s is not usable: %s%s", key_path, error, kept)
            return
        self._key, self._problem = key, None
        log.info("RSA private key loaded from %s (%d bits)", key_path, key.key_size)


@dataclass(frozen=True)
class SigningKey:
    """A trusted request signer: the file (queue-name prefix) it came from and its fingerprint."""

    prefix: str
    key: Ed25519PublicKey
    fingerprint: str


class RunnerKeyring:
    """The runner's keys: decryption (``--encrypt-dir``), request signers, response-queue encryption."""

    def __init__(
        self,
        encrypt_dir: Path | None = None,
        request_signatures_dir: Path | None = None,
        response_signatures_dir: Path | None = None,
    ) -> None:
        self.encrypt_dir = Path(encrypt_dir) if encrypt_dir else None
        self.request_signatures_dir = Path(request_signatures_dir) if request_signatures_dir else None
        self.response_signatures_dir = Path(response_signatures_dir) if response_signatures_dir else None
        self._decryption = DecryptionKey(self.encrypt_dir) if self.encrypt_dir else None
        self._signers = (
            KeyFolder(self.request_signatures_dir, load_signing_public_key, "request signing key")
            if self.request_signatures_dir
            else None
        )
        self._responses = (
            KeyFolder(self.response_signatures_dir, load_rsa_public_key, "response encryption key")
            if self.response_signatures_dir
            else None
        )

    @classmethod
    def from_options(
        cls,
        encrypt_dir: Path | None = None,
        request_signatures_dir: Path | None = None,
        response_signatures_dir: Path | None = None,
    ) -> RunnerKeyring | None:
        """None when no folder is given (a clear-text runner); ValueError for a setup that cannot work."""
        if not (encrypt_dir or request_signatures_dir or response_signatures_dir):
            return None
        if encrypt_dir and not request_signatures_dir:
            raise ValueError(
                "--encrypt-dir needs --request-signatures-dir: encrypted requests must be signed, "
                "and the signers' public keys are read from that folder"
            )
        if request_signatures_dir and not encrypt_dir:
            raise ValueError(
                "--request-signatures-dir needs --encrypt-dir: only encrypted requests carry signatures"
            )
        keys = cls(encrypt_dir, request_signatures_dir, response_signatures_dir)
        if keys._decryption is not None and keys._decryption.get() is None:
            raise ValueError(f"--encrypt-dir: {keys._decryption.problem}")
        return keys

    @property
    def decrypts(self) -> bool:
        """A runner given ``--encrypt-dir`` takes envelopes, and clear text only when allowed."""
        return self._decryption is not None

    def private_key(self) -> RSAPrivateKey | None:
        return self._decryption.get() if self._decryption else None

    def decryption_problem(self) -> str | None:
        return self._decryption.problem if self._decryption else "no --encrypt-dir"

    def signing_key(self, queue: str) -> SigningKey | None:
        """The signer trusted for ``queue``: the longest file-name prefix of the queue name."""
        if self._signers is None:
            return None
        found = self._signers.select(queue)
        if found is None:
            return None
        prefix, key = found
        return SigningKey(prefix, key, ssh_fingerprint(key))

    def signing_keys(self) -> list[SigningKey]:
        if self._signers is None:
            return []
        return [SigningKey(p, k, ssh_fingerprint(k)) for p, k in sorted(self._signers.keys().items())]

    def response_key(self, response_queue: str) -> RSAPublicKey | None:
        """The RSA key reports to ``<queue>_response`` are sealed with (longest prefix of that name)."""
        if self._responses is None:
            return None
        found = self._responses.select(response_queue)
        return found[1] if found else None

    def describe(self) -> str:
        parts = []
        if self.encrypt_dir:
            parts.append(f"decryption key in {self.encrypt_dir}")
        if self.request_signatures_dir:
            parts.append(f"request signers in {self.request_signatures_dir}")
        if self.response_signatures_dir:
            parts.append(f"response keys in {self.response_signatures_dir}")
        return ", ".join(parts)


# --- opening ------------------------------------------------------------------------------------
def open_message(
    body: bytes | str, queue: str | None, keys: RunnerKeyring | None, *, clear_text_allowed: bool
) -> Request:
    """The request a message carries, or RequestError with the reason it is refused.

    ``queue`` selects the signing key; ``None`` (``studio-runner run``, no queue involved) accepts
    a signature from any trusted signer. A runner with a decryption key refuses clear text unless
    ``clear_text_allowed``; a runner without one refuses envelopes.
    """
    document = parse_message(body)
    if not is_envelope(document):
        if keys is not None and keys.decrypts and not clear_text_allowed:
            raise EnvelopeError(
                "clear_text_refused",
                "clear-text request refused: this runner takes encrypted and signed requests "
                "(--encrypt-dir) and --clear-text-messages is off",
            )
        return decode_request(document)
    private_key = keys.private_key() if keys is not None else None
    if keys is None or private_key is None:
        why = (
            f"this runner's decryption key is not usable: {keys.decryption_problem()}"
            if keys is not None and keys.decrypts
            else "this runner has no decryption key (start it with --encrypt-dir)"
        )
        raise EnvelopeError("no_decryption_key", f"encrypted request refused: {why}")
    message = document["message"]
    payload = message.get("payload")
    if not isinstance(payload, str) or not payload:
        raise EnvelopeError("malformed_payload", "the envelope's 'payload' is not a non-empty string")
    _verify(message, payload, queue, keys)
    clear = hybrid_open(payload, private_key)
    try:
        inner = json.loads(clear)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise EnvelopeError("malformed_payload", f"the decrypted request is not JSON: {error}") from None
    if not isinstance(inner, dict):
        raise EnvelopeError(
            "malformed_payload", f"the decrypted request is a JSON {type(inner).__name__}, not an object"
        )
    if is_envelope(inner):
        raise EnvelopeError("malformed_payload", "the decrypted request is itself an envelope")
    return decode_request(inner)


def _verify(message: dict[str, Any], payload: str, queue: str | None, keys: RunnerKeyring) -> SigningKey:
    signature_text = message.get("signature")
    if not isinstance(signature_text, str) or not signature_text.strip():
        raise EnvelopeError(
            "no_signature", "encrypted request has no signature: this runner only takes signed requests"
        )
    signature = _signature_bytes(signature_text)
    claimed = message.get("fingerprint")
    data = payload.encode("utf-8", "surrogatepass")  # a lone surrogate cannot verify, but must not crash
    if queue is None:
        candidates = keys.signing_keys()
        if not candidates:
            raise EnvelopeError("no_signing_key", f"no trusted signing keys in {keys.request_signatures_dir}")
        for candidate in candidates:
            if _verifies(candidate.key, signature, data):
                return candidate
        raise EnvelopeError(
            "bad_signature",
            "the signature does not verify with any trusted signing key: the payload was altered "
            "or signed with a key this runner does not trust",
        )
    signer = keys.signing_key(queue)
    if signer is None:
        raise EnvelopeError(
            "no_signing_key",
            f"no signing key for queue {queue!r} in {keys.request_signatures_dir} (each file there is "
            "named with a queue-name prefix and holds the signer's 'ssh-ed25519' public key)",
        )
    if isinstance(claimed, str) and claimed and claimed != signer.fingerprint:
        log.info(
            "request on %s claims signer %s; the key for prefix %r is %s",
            queue,
            claimed,
            signer.prefix,
            signer.fingerprint,
        )
    if not _verifies(signer.key, signature, data):
        raise EnvelopeError(
            "bad_signature",
            f"the signature does not verify with the signing key for prefix {signer.prefix!r} "
            f"({signer.fingerprint}): the payload was altered or signed with another key",
        )
    return signer


def _verifies(key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


# --- sealing ------------------------------------------------------------------------------------
def seal(
    request_json: str,
    public_key: RSAPublicKey | bytes | str,
    signing_key: Ed25519PrivateKey | bytes | str,
) -> dict[str, Any]:
    """An envelope for ``request_json`` as the StudioML client builds one: clear-text header, payload, signature.

    ``public_key`` is the runner's RSA key (object or PEM); ``signing_key`` the sender's Ed25519
    key (object, OpenSSH or PEM private key). The header repeats a few request fields in clear
    text, as the client does (``experiment_lifetime`` carries ``max_duration``, a client quirk).
    """
    if not isinstance(public_key, RSAPublicKey):
        public_key = load_rsa_public_key(public_key)
    if not isinstance(signing_key, Ed25519PrivateKey):
        signing_key = load_signing_private_key(signing_key)
    document = json.loads(request_json)
    if not isinstance(document, dict) or not isinstance(document.get("experiment"), dict):
        raise ValueError("request_json must be a StudioML request object with an 'experiment'")
    experiment = document["experiment"]
    payload = hybrid_seal(request_json.encode("utf-8"), public_key)
    time_added = experiment.get("time_added")
    return {
        "message": {
            "experiment": {
                "status": experiment.get("status", "unknown"),
                "pythonver": experiment.get("pythonver", "unknown"),
            },
            "time_added": time_added
            if isinstance(time_added, (int, float)) and math.isfinite(time_added)
            else None,
            "experiment_lifetime": experiment.get("max_duration", "unknown"),
            "resources_needed": experiment.get("resources_needed"),
            "payload": payload,
            "signature": base64.b64encode(signing_key.sign(payload.encode("utf-8"))).decode("ascii"),
            "fingerprint": ssh_fingerprint(signing_key.public_key()),
        }
    }
