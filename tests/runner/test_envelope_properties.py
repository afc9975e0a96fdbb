"""``open_message`` on arbitrary input: a Request or a RequestError, never any other exception.

Messages come from anyone who can publish to a queue, so garbage must end as a clear refusal
(dead-lettered with its reason), never as a crash of the handler. ``STUDIO_HYPOTHESIS_EXAMPLES``
sets the number of examples per property (default 300).
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from studio_runner.envelope import RunnerKeyring, hybrid_seal, open_message, ssh_fingerprint
from studio_runner.request import Request, RequestError

from tests.runner.json_documents import json_documents

EXAMPLES = int(os.environ.get("STUDIO_HYPOTHESIS_EXAMPLES", "300"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Keys are made once: hypothesis runs each property many times and key generation is slow.
RUNNER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
SIGNER = ed25519.Ed25519PrivateKey.generate()
_FOLDER = Path(tempfile.mkdtemp(prefix="envelope-properties-"))
(_FOLDER / "message" / "encryption").mkdir(parents=True)
(_FOLDER / "message" / "encryption" / "ssh-privatekey").write_bytes(
    RUNNER_KEY.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
)
(_FOLDER / "signing").mkdir()
(_FOLDER / "signing" / "rmq_").write_bytes(
    SIGNER.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
)
KEYS = RunnerKeyring.from_options(_FOLDER / "message", _FOLDER / "signing")
QUEUES = st.sampled_from(["rmq_team_a", "sqs_elsewhere", "", None])
RUNNER_KEYS = st.sampled_from([KEYS, None])

json_values = json_documents(text_size=30, key_size=12, leaves=20)
experiment_keys = [
    "key",
    "filename",
    "args",
    "pythonver",
    "pythonenv",
    "artifacts",
    "resources_needed",
    "max_duration",
    "time_added",
]
experiments = st.dictionaries(st.sampled_from(experiment_keys) | st.text(max_size=8), json_values, max_size=6)
requests = st.fixed_dictionaries({"experiment": experiments | json_values}, optional={"config": json_values})
base64_text = st.binary(max_size=600).map(lambda data: base64.b64encode(data).decode())
payloads = st.one_of(
    json_values,
    st.text(max_size=80),
    st.tuples(base64_text, base64_text).map(",".join),
    st.tuples(base64_text, base64_text, base64_text).map(",".join),
    st.builds(lambda data: hybrid_seal(data, RUNNER_KEY.public_key()), st.binary(max_size=200)),
    st.builds(lambda document: hybrid_seal(json.dumps(document).encode(), RUNNER_KEY.public_key()), requests),
    st.builds(lambda value: hybrid_seal(json.dumps(value).encode(), RUNNER_KEY.public_key()), json_values),
)
signatures = st.one_of(
    st.none(),
    json_values,
    st.text(max_size=20),
    st.binary(min_size=0, max_size=100).map(lambda b: base64.b64encode(b).decode()),
)


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """Envelope-shaped objects: garbage payloads, garbage signatures, and validly signed garbage."""
    payload = draw(payloads)
    message: dict[str, Any] = draw(
        st.dictionaries(
            st.sampled_from(["experiment", "time_added", "resources_needed", "fingerprint"]),
            json_values,
            max_size=3,
        )
    )
    message["payload"] = payload
    if isinstance(payload, str) and draw(st.booleans()):  # signed by the trusted key: reaches decryption
        message["signature"] = base64.b64encode(
            SIGNER.sign(payload.encode("utf-8", "surrogatepass"))
        ).decode()
        message["fingerprint"] = ssh_fingerprint(SIGNER.public_key())
    else:
        signature = draw(signatures)
        if signature is not None:
            message["signature"] = signature
    return {"message": message}


def opens_or_refuses(
    body: bytes | str, queue: str | None, keys: RunnerKeyring | None, clear_text_allowed: bool
) -> None:
    try:
        request = open_message(body, queue, keys, clear_text_allowed=clear_text_allowed)
    except RequestError as error:
        assert str(error)  # always a reason
    else:
        assert isinstance(request, Request)


@PROPERTY
@given(body=st.binary(max_size=2000), queue=QUEUES, keys=RUNNER_KEYS, clear=st.booleans())
def test_arbitrary_bytes_are_refused_with_a_reason(body, queue, keys, clear):
    opens_or_refuses(body, queue, keys, clear)


@PROPERTY
@given(document=json_values | requests, queue=QUEUES, keys=RUNNER_KEYS, clear=st.booleans())
def test_arbitrary_json_opens_or_is_refused(document, queue, keys, clear):
    opens_or_refuses(json.dumps(document), queue, keys, clear)


@PROPERTY
@given(envelope=envelopes(), queue=QUEUES, keys=RUNNER_KEYS, clear=st.booleans())
def test_envelope_shaped_garbage_is_refused_with_a_reason(envelope, queue, keys, clear):
    opens_or_refuses(json.dumps(envelope).encode(), queue, keys, clear)


@PROPERTY
@given(text=st.text(max_size=300), nesting=st.integers(min_value=0, max_value=5000))
def test_pathological_json_text_is_refused(text, nesting):
    """Lone surrogates, huge integers and deep nesting come through ``json.loads`` as other exceptions."""
    deep = "[" * nesting + "]" * nesting
    for body in (
        deep,
        '{"experiment": {"key": "k", "info": ' + deep[:1800] + "}}",
        "9" * (nesting + 1),
        json.dumps({"message": {"payload": text}}),
        text,
    ):
        opens_or_refuses(body, "rmq_team_a", KEYS, False)
        opens_or_refuses(body.encode("utf-8", "surrogatepass"), "rmq_team_a", None, True)
