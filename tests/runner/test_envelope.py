"""Encrypted and signed requests (spec §6): our sealing and opening, the real client's builder, end to end.

Every refusal is a ``RequestError`` (dead-lettered, never requeued) with its own reason, so an
operator reading ``x-studio-reject-reason`` knows which key or rule to fix.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from studio_runner.envelope import (
    EnvelopeError,
    RunnerKeyring,
    hybrid_seal,
    open_message,
    seal,
    ssh_fingerprint,
)
from studio_runner.request import Request, RequestError

from tests.broker import dead_letters, publish_like_client, queue_depth, unique_queue
from tests.polling import wait_for
from tests.runner.client_requests import client_request
from tests.runner.results import final_document, tar_members

PASSPHRASE = b"correct horse battery staple"


# --- key material ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runner_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_runner_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def signer() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def other_signer() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def private_pem(key: rsa.RSAPrivateKey, passphrase: bytes | None) -> bytes:
    """Legacy ``RSA PRIVATE KEY`` PEM, encrypted (``Proc-Type: 4,ENCRYPTED``) when a passphrase is given."""
    encryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, encryption
    )


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)


def openssh_public(key: ed25519.Ed25519PrivateKey, comment: str = "experimenter@laptop") -> bytes:
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + f" {comment}\n".encode()


def openssh_private(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )


def write_encrypt_dir(root: Path, key: rsa.RSAPrivateKey, passphrase: bytes | None = PASSPHRASE) -> Path:
    """The ``--encrypt-dir`` layout of spec §6.1; the passphrase file ends in a newline, as ``--from-file`` makes it."""
    (root / "encryption").mkdir(parents=True, exist_ok=True)
    (root / "encryption" / "ssh-privatekey").write_bytes(private_pem(key, passphrase))
    (root / "encryption" / "ssh-publickey").write_bytes(public_pem(key))
    if passphrase is not None:
        (root / "passphrase").mkdir(exist_ok=True)
        (root / "passphrase" / "ssh-passphrase").write_bytes(passphrase + b"\n")
    return root


def write_signers(folder: Path, signers: dict[str, ed25519.Ed25519PrivateKey]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, key in signers.items():
        (folder / prefix).write_bytes(openssh_public(key))
    return folder


def request_json(key: str = "exp-1") -> str:
    return json.dumps(
        {
            "experiment": {
                "key": key,
                "filename": "train.py",
                "args": ["--lr", "0.1"],
                "pythonver": "3.11",
                "status": "waiting",
                "time_added": 1718031122.5,
                "max_duration": "20m",
                "resources_needed": {"cpus": 1, "ram": "1g", "hdd": "1g", "gpus": 0},
                "artifacts": {},
            },
            "config": {"env": {"AWS_SECRET_ACCESS_KEY": "s3cr3t"}},
        }
    )


@pytest.fixture
def keys(tmp_path, runner_key, signer) -> RunnerKeyring:
    """A runner taking encrypted requests on ``rmq_team_*`` queues signed by ``signer``."""
    built = RunnerKeyring.from_options(
        write_encrypt_dir(tmp_path / "message", runner_key),
        write_signers(tmp_path / "signing", {"rmq_team_": signer}),
    )
    assert built is not None
    return built


def envelope_bytes(envelope: dict[str, Any]) -> bytes:
    return json.dumps(envelope).encode()


def refusal(
    body: bytes, queue: str | None, keys: RunnerKeyring | None, *, clear_text_allowed: bool = False
) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as caught:
        open_message(body, queue, keys, clear_text_allowed=clear_text_allowed)
    return caught.value


def resign(envelope: dict[str, Any], key: ed25519.Ed25519PrivateKey) -> dict[str, Any]:
    message = envelope["message"]
    message["signature"] = base64.b64encode(key.sign(message["payload"].encode())).decode()
    message["fingerprint"] = ssh_fingerprint(key.public_key())
    return envelope


def flip_base64_char(text: str, index: int) -> str:
    replacement = "A" if text[index] != "A" else "B"
    return text[:index] + replacement + text[index + 1 :]


# --- sealing and opening -----------------------------------------------------------------------
def test_seal_then_open_round_trip_with_the_client_header(keys, runner_key, signer):
    envelope = seal(request_json(), runner_key.public_key(), signer)
    message = envelope["message"]
    assert message["experiment"] == {"status": "waiting", "pythonver": "3.11"}
    assert message["time_added"] == 1718031122.5
    assert message["experiment_lifetime"] == "20m"  # the client's quirk: max_duration goes here
    assert message["resources_needed"]["cpus"] == 1
    assert message["fingerprint"] == ssh_fingerprint(signer.public_key())
    assert "s3cr3t" not in json.dumps(envelope)
    wrapped, boxed = message["payload"].split(",")
    assert len(base64.b64decode(wrapped)) == 256  # RSA-2048 block
    assert len(base64.b64decode(boxed)) == 24 + 16 + len(request_json().encode())  # nonce + MAC + text

    request = open_message(envelope_bytes(envelope), "rmq_team_a", keys, clear_text_allowed=False)
    assert isinstance(request, Request)
    assert request.key == "exp-1"
    assert request.experiment.args == ["--lr", "0.1"]
    assert request.config.env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"


def test_seal_accepts_pem_and_openssh_key_text(keys, runner_key, signer):
    envelope = seal(request_json(), public_pem(runner_key).decode(), openssh_private(signer))
    assert open_message(envelope_bytes(envelope), "rmq_team_a", keys, clear_text_allowed=False).key == "exp-1"


def test_an_ssh_wire_signature_blob_is_accepted(keys, runner_key, signer):
    envelope = seal(request_json(), runner_key.public_key(), signer)
    raw = base64.b64decode(envelope["message"]["signature"])
    blob = b"".join(len(part).to_bytes(4, "big") + part for part in (b"ssh-ed25519", raw))
    envelope["message"]["signature"] = base64.b64encode(blob).decode()
    assert open_message(envelope_bytes(envelope), "rmq_team_a", keys, clear_text_allowed=False).key == "exp-1"


def test_tampered_ciphertext_is_refused_even_when_signed_again(keys, runner_key, signer):
    envelope = seal(request_json(), runner_key.public_key(), signer)
    wrapped, boxed = envelope["message"]["payload"].split(",")
    envelope["message"]["payload"] = wrapped + "," + flip_base64_char(boxed, 60)
    error = refusal(envelope_bytes(resign(envelope, signer)), "rmq_team_a", keys)
    assert error.code == "tampered"
    assert "fails authentication" in str(error)


def test_tampered_payload_fails_the_signature(keys, runner_key, signer):
    envelope = seal(request_json(), runner_key.public_key(), signer)
    wrapped, boxed = envelope["message"]["payload"].split(",")
    envelope["message"]["payload"] = wrapped + "," + flip_base64_char(boxed, 60)
    error = refusal(envelope_bytes(envelope), "rmq_team_a", keys)
    assert error.code == "bad_signature"
    assert "does not verify" in str(error) and "'rmq_team_'" in str(error)


def test_a_request_signed_with_an_untrusted_key_is_refused(keys, runner_key, other_signer):
    envelope = seal(request_json(), runner_key.public_key(), other_signer)
    error = refusal(envelope_bytes(envelope), "rmq_team_a", keys)
    assert error.code == "bad_signature"


def test_a_request_encrypted_for_another_runner_is_refused(keys, other_runner_key, signer):
    envelope = seal(request_json(), other_runner_key.public_key(), signer)
    error = refusal(envelope_bytes(envelope), "rmq_team_a", keys)
    assert error.code == "undecryptable"
    assert "another runner key" in str(error)


@pytest.mark.parametrize("signature", [None, "", "   "])
def test_a_missing_signature_is_refused(keys, runner_key, signer, signature):
    envelope = seal(request_json(), runner_key.public_key(), signer)
    if signature is None:
        del envelope["message"]["signature"]
    else:
        envelope["message"]["signature"] = signature
    error = refusal(envelope_bytes(envelope), "rmq_team_a", keys)
    assert error.code == "no_signature"


def test_a_queue_without_a_signing_key_is_refused(keys, runner_key, signer):
    envelope = seal(request_json(), runner_key.public_key(), signer)
    error = refusal(envelope_bytes(envelope), "rmq_other_queue", keys)
    assert error.code == "no_signing_key"
    assert "rmq_other_queue" in str(error)


def test_the_longest_queue_prefix_selects_the_signing_key(tmp_path, runner_key, signer, other_signer):
    keys = RunnerKeyring(
        write_encrypt_dir(tmp_path / "message", runner_key),
        write_signers(tmp_path / "signing", {"rmq_team_": signer, "rmq_team_b_": other_signer}),
    )
    by_team = envelope_bytes(seal(request_json(), runner_key.public_key(), signer))
    by_team_b = envelope_bytes(seal(request_json(), runner_key.public_key(), other_signer))

    assert open_message(by_team, "rmq_team_a_1", keys, clear_text_allowed=False).key == "exp-1"
    assert open_message(by_team_b, "rmq_team_b_1", keys, clear_text_allowed=False).key == "exp-1"
    # the team key does not cover team b's queues, nor team b's key the team's other queues
    assert refusal(by_team, "rmq_team_b_1", keys).code == "bad_signature"
    assert refusal(by_team_b, "rmq_team_a_1", keys).code == "bad_signature"
    assert keys.signing_key("rmq_team_b_1").prefix == "rmq_team_b_"
    assert keys.signing_key("rmq_team_b").prefix == "rmq_team_"  # a prefix of the queue name, not the reverse


def test_without_a_queue_any_trusted_signer_is_accepted(tmp_path, runner_key, signer, other_signer):
    """``studio-runner run`` has no queue: the signature must come from some trusted signer."""
    keys = RunnerKeyring(
        write_encrypt_dir(tmp_path / "message", runner_key),
        write_signers(tmp_path / "signing", {"rmq_team_": signer}),
    )
    assert (
        open_message(
            envelope_bytes(seal(request_json(), runner_key.public_key(), signer)),
            None,
            keys,
            clear_text_allowed=False,
        ).key
        == "exp-1"
    )
    untrusted = envelope_bytes(seal(request_json(), runner_key.public_key(), other_signer))
    assert refusal(untrusted, None, keys).code == "bad_signature"


def test_rewritten_signing_keys_take_effect_without_a_restart(
    keys, tmp_path, runner_key, signer, other_signer
):
    by_signer = envelope_bytes(seal(request_json(), runner_key.public_key(), signer))
    by_other = envelope_bytes(seal(request_json(), runner_key.public_key(), other_signer))
    assert open_message(by_signer, "rmq_team_a", keys, clear_text_allowed=False).key == "exp-1"

    (tmp_path / "signing" / "rmq_team_").write_bytes(openssh_public(other_signer))  # rotation, same size
    assert refusal(by_signer, "rmq_team_a", keys).code == "bad_signature"
    assert open_message(by_other, "rmq_team_a", keys, clear_text_allowed=False).key == "exp-1"

    (tmp_path / "signing" / "rmq_team_").unlink()
    assert refusal(by_other, "rmq_team_a", keys).code == "no_signing_key"
    (tmp_path / "signing" / "rmq_").write_bytes(openssh_public(other_signer))
    assert open_message(by_other, "rmq_team_a", keys, clear_text_allowed=False).key == "exp-1"


def test_a_broken_key_file_keeps_the_last_good_key(keys, tmp_path, runner_key, signer):
    by_signer = envelope_bytes(seal(request_json(), runner_key.public_key(), signer))
    assert open_message(by_signer, "rmq_team_a", keys, clear_text_allowed=False).key == "exp-1"
    (tmp_path / "signing" / "rmq_team_").write_text("ssh-ed25519 not-base64!\n")
    assert open_message(by_signer, "rmq_team_a", keys, clear_text_allowed=False).key == "exp-1"


def kubernetes_secret(folder: Path, files: dict[str, bytes], version: str) -> None:
    """Lay out or update ``folder`` as the kubelet does: files link through ``..data``, swapped atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"..{version}"
    data.mkdir()
    for name, content in files.items():
        (data / name).write_bytes(content)
    staged = folder / "..data_tmp"
    staged.symlink_to(data.name)
    os.replace(staged, folder / "..data")
    for name in files:
        link = folder / name
        if not link.is_symlink():
            link.symlink_to(Path("..data") / name)


def test_mounted_secret_updates_swap_the_keys(tmp_path, runner_key, other_runner_key, signer, other_signer):
    message_dir, signing_dir = tmp_path / "message", tmp_path / "signing"
    kubernetes_secret(
        message_dir / "encryption", {"ssh-privatekey": private_pem(runner_key, PASSPHRASE)}, "v1"
    )
    kubernetes_secret(message_dir / "passphrase", {"ssh-passphrase": PASSPHRASE}, "v1")
    kubernetes_secret(signing_dir, {"rmq_team_": openssh_public(signer)}, "v1")
    keys = RunnerKeyring.from_options(message_dir, signing_dir)
    assert keys is not None
    old = envelope_bytes(seal(request_json(), runner_key.public_key(), signer))
    new = envelope_bytes(seal(request_json(), other_runner_key.public_key(), other_signer))
    assert open_message(old, "rmq_team_a", keys, clear_text_allowed=False).key == "exp-1"

    kubernetes_secret(signing_dir, {"rmq_team_": openssh_public(other_signer)}, "v2")
    kubernetes_secret(
        message_dir / "encryption", {"ssh-privatekey": private_pem(other_runner_key, PASSPHRASE)}, "v2"
    )
    assert open_message(new, "rmq_team_a", keys, clear_text_allowed=False).key == "exp-1"
    assert refusal(old, "rmq_team_a", keys).code == "bad_signature"
    for_the_old_key = envelope_bytes(resign(json.loads(old), other_signer))
    assert refusal(for_the_old_key, "rmq_team_a", keys).code == "undecryptable"


# --- the runner's private key --------------------------------------------------------------------
def test_a_passphrase_protected_private_key_is_opened(tmp_path, runner_key, signer):
    encrypt_dir = write_encrypt_dir(tmp_path / "message", runner_key, PASSPHRASE)
    assert b"Proc-Type: 4,ENCRYPTED" in (encrypt_dir / "encryption" / "ssh-privatekey").read_bytes()
    keys = RunnerKeyring.from_options(encrypt_dir, write_signers(tmp_path / "signing", {"rmq_": signer}))
    envelope = seal(request_json(), runner_key.public_key(), signer)
    assert open_message(envelope_bytes(envelope), "rmq_x", keys, clear_text_allowed=False).key == "exp-1"


def test_a_clear_private_key_needs_no_passphrase(tmp_path, runner_key, signer):
    keys = RunnerKeyring.from_options(
        write_encrypt_dir(tmp_path / "message", runner_key, None),
        write_signers(tmp_path / "signing", {"rmq_": signer}),
    )
    envelope = seal(request_json(), runner_key.public_key(), signer)
    assert open_message(envelope_bytes(envelope), "rmq_x", keys, clear_text_allowed=False).key == "exp-1"


def test_a_wrong_or_missing_passphrase_stops_the_runner_at_start(tmp_path, runner_key, signer):
    encrypt_dir = write_encrypt_dir(tmp_path / "message", runner_key, PASSPHRASE)
    signing = write_signers(tmp_path / "signing", {"rmq_": signer})
    (encrypt_dir / "passphrase" / "ssh-passphrase").write_bytes(b"wrong\n")
    with pytest.raises(ValueError, match="cannot load the RSA private key"):
        RunnerKeyring.from_options(encrypt_dir, signing)
    (encrypt_dir / "passphrase" / "ssh-passphrase").unlink()
    with pytest.raises(ValueError, match="ssh-passphrase"):
        RunnerKeyring.from_options(encrypt_dir, signing)


def test_key_folders_must_be_given_together(tmp_path, runner_key, signer):
    assert RunnerKeyring.from_options() is None
    with pytest.raises(ValueError, match="--request-signatures-dir"):
        RunnerKeyring.from_options(write_encrypt_dir(tmp_path / "message", runner_key), None)
    with pytest.raises(ValueError, match="--encrypt-dir"):
        RunnerKeyring.from_options(None, write_signers(tmp_path / "signing", {"rmq_": signer}))
    with pytest.raises(ValueError, match="no readable RSA private key"):
        RunnerKeyring.from_options(tmp_path / "nowhere", tmp_path / "signing")


def test_a_small_rsa_key_is_refused(tmp_path, signer):
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="too small"):
        RunnerKeyring.from_options(
            write_encrypt_dir(tmp_path / "message", small), write_signers(tmp_path / "s", {"r": signer})
        )


# --- the clear-text policy -----------------------------------------------------------------------
def test_a_runner_with_keys_refuses_clear_text_unless_allowed(keys):
    error = refusal(request_json().encode(), "rmq_team_a", keys)
    assert error.code == "clear_text_refused"
    assert "--clear-text-messages" in str(error)
    assert open_message(request_json().encode(), "rmq_team_a", keys, clear_text_allowed=True).key == "exp-1"


def test_a_runner_without_keys_takes_clear_text_and_refuses_envelopes(runner_key, signer):
    assert open_message(request_json().encode(), "rmq_team_a", None, clear_text_allowed=False).key == "exp-1"
    envelope = envelope_bytes(seal(request_json(), runner_key.public_key(), signer))
    error = refusal(envelope, "rmq_team_a", None)
    assert error.code == "no_decryption_key"
    assert "--encrypt-dir" in str(error)


def test_a_runner_with_only_response_keys_takes_clear_text(tmp_path, runner_key, signer):
    (tmp_path / "responses").mkdir()
    keys = RunnerKeyring.from_options(response_signatures_dir=tmp_path / "responses")
    assert keys is not None and not keys.decrypts
    assert open_message(request_json().encode(), "rmq_team_a", keys, clear_text_allowed=False).key == "exp-1"
    envelope = envelope_bytes(seal(request_json(), runner_key.public_key(), signer))
    assert refusal(envelope, "rmq_team_a", keys).code == "no_decryption_key"


def test_every_refusal_has_its_own_reason(keys, runner_key, other_runner_key, signer, other_signer):
    def sealed(**changes: Any) -> dict[str, Any]:
        envelope = seal(request_json(), runner_key.public_key(), signer)
        envelope["message"].update(changes)
        return envelope

    good = sealed()
    wrapped, boxed = good["message"]["payload"].split(",")
    tampered = resign(sealed(payload=wrapped + "," + flip_base64_char(boxed, 60)), signer)
    cases = {
        "tampered": (envelope_bytes(tampered), "rmq_team_a", keys),
        "bad_signature": (
            envelope_bytes(sealed(payload=wrapped + "," + flip_base64_char(boxed, 60))),
            "rmq_team_a",
            keys,
        ),
        "no_signature": (envelope_bytes(sealed(signature="")), "rmq_team_a", keys),
        "no_signing_key": (envelope_bytes(good), "sqs_elsewhere", keys),
        "no_decryption_key": (envelope_bytes(good), "rmq_team_a", None),
        "clear_text_refused": (request_json().encode(), "rmq_team_a", keys),
        "undecryptable": (
            envelope_bytes(seal(request_json(), other_runner_key.public_key(), signer)),
            "rmq_team_a",
            keys,
        ),
        "malformed_payload": (envelope_bytes(resign(sealed(payload="no-comma"), signer)), "rmq_team_a", keys),
    }
    reasons = {}
    for code, (body, queue, runner_keys) in cases.items():
        error = refusal(body, queue, runner_keys)
        assert error.code == code, (code, str(error))
        assert isinstance(error, RequestError)
        reasons[code] = str(error)
    assert len(set(reasons.values())) == len(cases)


def test_a_sealed_message_that_is_not_a_request_is_refused(keys, runner_key, signer):
    envelope = seal(json.dumps({"experiment": {"key": "x"}}), runner_key.public_key(), signer)
    envelope["message"]["payload"] = hybrid_seal(b"[1, 2, 3]", runner_key.public_key())
    with pytest.raises(RequestError, match="not an object"):
        open_message(envelope_bytes(resign(envelope, signer)), "rmq_team_a", keys, clear_text_allowed=False)


# --- the real StudioML client --------------------------------------------------------------------
BUILD_WITH_CLIENT = """\
import json, sys, time
from studio.encrypted_payload_builder import EncryptedPayloadBuilder
from studio.experiment import Experiment

experiment = Experiment(
    key="client-built", filename="train.py", args=["two words"], pythonenv=["six==1.16.0"], artifacts={},
    resources_needed={"cpus": 1, "ram": "1g", "hdd": "1g", "gpus": 0}, time_added=time.time(),
    pythonver="3.11", max_duration="20m",
)
builder = EncryptedPayloadBuilder("interop", sys.argv[1], sys.argv[2])
print(json.dumps(builder.construct(experiment, {"env": {"PYTHONUNBUFFERED": "1"}}, [])))
"""


def test_the_real_clients_encrypted_payload_opens(studioml_client, tmp_path, runner_key, signer, keys):
    (tmp_path / "runner.pub").write_bytes(public_pem(runner_key))
    (tmp_path / "signer").write_bytes(openssh_private(signer))
    result = subprocess.run(
        [
            str(studioml_client / "python"),
            "-c",
            BUILD_WITH_CLIENT,
            str(tmp_path / "runner.pub"),
            str(tmp_path / "signer"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    body = result.stdout.strip().splitlines()[-1].encode()
    message = json.loads(body)["message"]
    assert message["fingerprint"] == ssh_fingerprint(signer.public_key())  # same OpenSSH fingerprint
    assert len(base64.b64decode(message["signature"])) == 64  # raw Ed25519 signature

    request = open_message(body, "rmq_team_42", keys, clear_text_allowed=False)
    assert request.key == "client-built"
    assert request.experiment.args == ["'two words'"]  # the client shell-quotes arguments
    assert request.config.env == {"PYTHONUNBUFFERED": "1"}
    assert refusal(body, "rmq_elsewhere", keys).code == "no_signing_key"


TRAIN = """\
import sys
print("sealed arguments:", sys.argv[1:])
print('{"experiment": {"sealed": true}}')
"""


def test_studio_run_with_encryption_end_to_end(
    studio_client, serve_runner, s3_client, services, tmp_path, runner_key, signer, other_signer
):
    """``studio run`` with ``public_key_path``/``signing_key_path`` in its config, a runner with the keys."""
    queue = unique_queue("rmq_sealed")
    key = f"sealed_{queue}"
    encrypt_dir = write_encrypt_dir(tmp_path / "message", runner_key)
    signing_dir = write_signers(tmp_path / "signing", {"rmq_sealed_": signer})
    (tmp_path / "client-keys").mkdir()
    (tmp_path / "client-keys" / "runner.pub").write_bytes(public_pem(runner_key))
    (tmp_path / "client-keys" / "signer").write_bytes(openssh_private(signer))
    config = yaml.safe_load(studio_client.config.read_text())
    config["public_key_path"] = str(tmp_path / "client-keys" / "runner.pub")
    config["signing_key_path"] = str(tmp_path / "client-keys" / "signer")
    studio_client.config.write_text(yaml.safe_dump(config))
    runner = serve_runner("--encrypt-dir", str(encrypt_dir), "--request-signatures-dir", str(signing_dir))

    # refused before anything runs, each with its reason: clear text, and a signer this queue does not trust
    clear = client_request(services, studio_client.bucket, f"clear_{queue}", "blobstore/none.tar")
    untrusted = seal(json.dumps(clear), runner_key.public_key(), other_signer)
    publish_like_client(services.amqp_url, queue, [json.dumps(clear).encode(), envelope_bytes(untrusted)])

    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "train.py").write_text(TRAIN)
    studio_client.run(workspace, queue, "train.py", "alpha", "two words", key=key)

    document = wait_for(
        lambda: final_document(s3_client, studio_client.bucket, key), 300, "the scrape document"
    )
    assert document["studioml"]["status"] == "succeeded"
    assert document["experiment"] == {"sealed": True}
    output = tar_members(s3_client, studio_client.bucket, f"experiments/{key}/output.tar")[
        "./output"
    ].decode()
    assert "sealed arguments: ['alpha', 'two words']" in output

    dead = wait_for(lambda: dead_letters(services, queue), 30, "the dead letters")
    reasons = sorted(headers["x-studio-reject-reason"] for _body, headers in dead)
    assert len(reasons) == 2, reasons
    assert any("clear-text request refused" in reason for reason in reasons)
    assert any("signature does not verify" in reason for reason in reasons)
    assert all(reason.startswith("invalid:") for reason in reasons)  # dead-lettered at once, not retried
    assert wait_for(lambda: queue_depth(services.amqp_management_url, queue) == 0, 10, "the acks")
    assert runner.process.poll() is None
    assert services.s3_secret_key not in runner.log.read_text(errors="replace")  # decrypted, never logged


# --- studio-runner run: an Airflow pod's encrypted REQUEST_JSON -----------------------------------
def run_cli(
    tmp_path: Path, *options: str, env: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], str]:
    result_file = tmp_path / "result.json"
    result_file.unlink(missing_ok=True)
    runner = Path(sys.executable).parent / "studio-runner"
    command = [
        str(runner),
        "run",
        "--working-dir",
        str(tmp_path / "work"),
        "--result-file",
        str(result_file),
        *options,
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )
    summary = json.loads(result_file.read_text()) if result_file.exists() else {}
    return done.returncode, summary, done.stderr


def test_studio_runner_run_opens_an_encrypted_request_json(tmp_path, runner_key, signer, other_signer):
    encrypt_dir = write_encrypt_dir(tmp_path / "message", runner_key)
    signing_dir = write_signers(tmp_path / "signing", {"rmq_team_": signer})
    keys = ("--encrypt-dir", str(encrypt_dir))
    env = {"REQUEST_SIGNATURES_DIR": str(signing_dir)}  # every option also comes from the environment
    # the sealed request decodes only after verification and decryption: its own flaw names it
    flawed = json.loads(request_json())
    flawed["experiment"]["artifacts"] = {"workspace": {"qualified": "ftp://host/bucket/ws.tar"}}
    sealed = json.dumps(seal(json.dumps(flawed), runner_key.public_key(), signer))
    code, summary, _ = run_cli(tmp_path, *keys, "--request-json", sealed, env=env)
    assert code == 2 and summary["status"] == "invalid"
    assert "unsupported artifact URI scheme" in summary["reason"]

    untrusted = json.dumps(seal(json.dumps(flawed), runner_key.public_key(), other_signer))
    code, summary, _ = run_cli(tmp_path, *keys, "--request-json", untrusted, env=env)
    assert code == 2 and "signature does not verify" in summary["reason"]

    code, summary, _ = run_cli(tmp_path, *keys, "--request-json", json.dumps(flawed), env=env)
    assert code == 2 and "clear-text request refused" in summary["reason"]
    code, summary, _ = run_cli(
        tmp_path, *keys, "--clear-text-messages", "--request-json", json.dumps(flawed), env=env
    )
    assert code == 2 and "unsupported artifact URI scheme" in summary["reason"]

    code, summary, stderr = run_cli(tmp_path, *keys, "--request-json", sealed)
    assert code == 2 and not summary and "--encrypt-dir needs --request-signatures-dir" in stderr
