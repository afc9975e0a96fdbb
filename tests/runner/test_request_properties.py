"""``decode_request`` on arbitrary input: a valid Request or a RequestError with a reason, nothing else.

Any publisher can put anything on a queue, and the queue sensor peeks at bodies with the same
decoder, so garbage must end as a refusal the runner can dead-letter at once. A Request that
decodes must also be usable: the accessors the runner calls later never raise, it re-encodes to
the same wire document, and its redacted form holds no credential. ``STUDIO_HYPOTHESIS_EXAMPLES``
sets the number of examples per property (default 300); five properties target the decoder.

Generation is kept cheap (hypothesis spends its time per draw): paths, hostile values and raw JSON
fragments come from pools built once, so one mutation is a handful of draws.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from studio_runner.limits import HARD_CAP_SECONDS, checkpoint_period, time_limit
from studio_runner.request import MAX_REQUEST_BYTES, REDACTED, Request, RequestError, decode_request
from studio_runner.requirements import groom

from tests.runner.json_documents import json_documents

pytestmark = pytest.mark.timeout(900)  # a decoder gone quadratic on megabyte fields hangs, not fails

EXAMPLES = int(os.environ.get("STUDIO_HYPOTHESIS_EXAMPLES", "300"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DATA = Path(__file__).resolve().parents[1] / "data"


def captured(name: str) -> dict[str, Any]:
    return json.loads((DATA / f"{name}.json").read_text())["body"]


# --- valid starting points: what real clients send, and the lenient forms upstream accepted ------
TEMPLATES: list[dict[str, Any]] = [
    captured("studio_run_cli"),
    captured("completion_service_task"),
    {"experiment": {"key": "k1"}},
    {
        "experiment": {
            "key": "upstream_forms",
            "filename": "train.py",
            "args": [1, 2.5, "three"],
            "pythonver": 3.11,
            "pythonenv": None,
            "time_added": "1718031122.5",
            "max_duration": "",
            "resources_needed": {"cpus": "2", "gpus": 1, "gpuCount": "1", "ram": 2_000_000_000, "hdd": None},
            "artifacts": {
                "workspace": {
                    "qualified": "s3://user:pw@s3.us-west-2.amazonaws.com/bucket/blobstore/ws.tar",
                    "unpack": True,
                    "credentials": {"aws": {"access_key": "AK", "secret_key": "SK"}},
                },
                "output": {"qualified": "file:///srv/results/output.tar", "mutable": True},
                "unused": {"qualified": ""},
            },
        },
        "config": None,
    },
]

for _template in TEMPLATES:  # every template is a valid request, or the properties prove nothing
    decode_request(_template)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key and (first three) list positions in a document, outermost first."""
    found: list[tuple[Any, ...]] = []
    if isinstance(value, dict):
        for key, child in value.items():
            found.append((*prefix, key))
            found.extend(paths(child, (*prefix, key)))
    elif isinstance(value, list):
        for index, child in enumerate(value[:3]):
            found.append((*prefix, index))
            found.extend(paths(child, (*prefix, index)))
    return found


TEMPLATE_PATHS = [sorted(set(paths(t)), key=repr) for t in TEMPLATES]


def get(document: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        document = document[part]
    return document


CONTAINERS = [
    [(), *(p for p in ps if isinstance(get(t, p), (dict, list)))]
    for t, ps in zip(TEMPLATES, TEMPLATE_PATHS, strict=True)
]


class Raw(str):
    """JSON text put into the body verbatim: what ``json.dumps`` would never write."""


RAW_FRAGMENTS = [
    Raw("NaN"),
    Raw("-Infinity"),
    Raw("1e999"),
    Raw("-1e999"),
    Raw("1" * 4301),  # past Python's int-from-text digit limit
    Raw("4.9e-400"),
    Raw("[" * 3000 + "]" * 3000),  # past json's recursion limit
    Raw('{"a":' * 400 + "1" + "}" * 400),
    Raw('"\\ud800"'),  # a lone surrogate
    Raw('"\\u0000"'),
    Raw('{"key": 1, "key": "dup"}'),
    Raw("[1,]"),  # broken from here down: the whole body stops being JSON
    Raw("tru"),
    Raw('"unterminated'),
]
BIG_STRING = "x" * (1 << 20)
BIG_LIST = ["arg"] * 100_000
BIG_DICT = {f"K{i}": str(i) for i in range(20_000)}
HOSTILE: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    2**63,
    -(2**64),
    10**300,
    1e308,
    "",
    " ",
    "0",
    "-1",
    "1e999",
    "9" * 400,
    "9" * 5000,
    "²",
    "١٢",
    "\x00",
    "\u2028",
    "\ud800",
    "../../etc/passwd",
    "/etc/passwd",
    ".",
    "..",
    "a/b",
    "k\nk",
    "s3://",
    "s3://host/only-bucket",
    "s3://[::1/b/k",
    "s3://h:99999999/b/k",
    "ftp://user:ftppassword@h/b/k",
    "file:///etc/shadow",
    "file://",
    "http://h/b/k",
    "1h30m",
    "-5m",
    "1d",
    "10g",
    "16GiB",
    "1.5.5",
    "3.10",
    "-1g",
    "0.5",
    BIG_STRING,
    BIG_LIST,
    BIG_DICT,
    [],
    {},
    [None],
    [1, "a", None, [], {}],
    {"a": {"b": {"c": [1, {"d": None}]}}},
    {"qualified": 5},
    {"aws": "not an object"},
    {"aws": {"access_key": 1, "secret_access_key": ["x"]}},
    {"credentials": "flat"},
    {"credentials": {"aws": []}},
    ["--lr", 0.1, None],
    *RAW_FRAGMENTS,
]
NEW_KEYS = [
    "x",
    "",
    "experiment",
    "config",
    "message",
    "gpu_count",
    "gpuCount",
    "secret_key",
    "saveFrequency",
    "save_frequency",
    "credentials",
    "storage",
    "workspace",
    "../evil",
    "key",
    "qualified",
    "password",
]
SIZES = [None] * 30 + [MAX_REQUEST_BYTES - 1, MAX_REQUEST_BYTES, MAX_REQUEST_BYTES + 1, 2 * MAX_REQUEST_BYTES]
FORMS = ["str", "bytes", "bytes", "dict", "dict", "utf-16", "latin-1"]


def mutate(
    document: dict[str, Any], template: int, mutations: list[tuple[int, int, int, int]]
) -> dict[str, Any]:
    """Apply (kind, which path, which value, which new key) mutations to a copy of the document."""
    document = copy.deepcopy(document)
    for kind, path_index, value_index, key_index in mutations:
        value = fresh(HOSTILE[value_index % len(HOSTILE)])
        if kind == 2:  # a new member in some object, or a new list element
            candidates = CONTAINERS[template]
            path = candidates[path_index % len(candidates)]
        else:
            candidates = TEMPLATE_PATHS[template]
            path = candidates[path_index % len(candidates)]
        try:
            parent = get(document, path[:-1]) if kind != 2 else get(document, path)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced the parent
        if kind == 0 and isinstance(parent, (dict, list)):  # replace
            try:
                parent[path[-1]] = value
            except (IndexError, TypeError):
                continue
        elif kind == 1 and isinstance(parent, (dict, list)):  # delete
            try:
                del parent[path[-1]]
            except (KeyError, IndexError, TypeError):
                continue
        elif kind == 2 and isinstance(parent, dict):
            parent[NEW_KEYS[key_index % len(NEW_KEYS)]] = value
        elif kind == 2 and isinstance(parent, list):
            parent.append(value)
    return document


def fresh(value: Any) -> Any:
    """A private copy of a pooled value: later mutations may append to it, and the pool is shared."""
    if isinstance(value, list):
        return list(value) if len(value) > 100 else copy.deepcopy(value)  # big ones hold only strings
    if isinstance(value, dict):
        return dict(value) if len(value) > 100 else copy.deepcopy(value)
    return value


def encode(document: Any) -> str:
    """JSON text with every ``Raw`` fragment spliced in where its placeholder was dumped."""
    raws: list[Raw] = []

    def mark(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(value)
            return f"@@raw{len(raws) - 1}@@"
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        return value

    text = json.dumps(mark(document))
    for index, raw in enumerate(raws):
        text = text.replace(f'"@@raw{index}@@"', raw, 1)
    return text


def has_raw(value: Any) -> bool:
    if isinstance(value, Raw):
        return True
    if isinstance(value, dict):
        return any(has_raw(v) for v in value.values())
    if isinstance(value, list):
        return any(has_raw(v) for v in value)
    return False


def pad_to(text: str, size: int) -> str:
    """The same object with a leading padding member, ``size`` characters long in all."""
    filler = size - len(text) - len('"pad":"",')
    if not text.startswith("{") or filler < 0:
        return text
    return '{"pad":"' + "p" * filler + '",' + text[1:]


def body_for(document: Any, form: str, size: int | None, cut: int | None) -> bytes | str | dict[str, Any]:
    if (
        form == "dict"
        and isinstance(document, dict)
        and not has_raw(document)
        and size is None
        and cut is None
    ):
        return document
    text = encode(document)
    if size is not None:
        text = pad_to(text, size)
    if cut is not None:
        text = text[: cut % (len(text) + 1)]
    if form == "str":
        return text
    if form == "utf-16":
        return text.encode("utf-16", "surrogatepass")  # json.loads detects UTF-16 and UTF-32 by its BOM
    if form == "latin-1":
        return text.encode("latin-1", "replace")
    return text.encode("utf-8", "surrogatepass")


# --- what every outcome must satisfy --------------------------------------------------------------
def canonical(document: Any) -> str:
    return json.dumps(document, sort_keys=True)


def usable(request: Request) -> None:
    """What the runner reads from a request after decoding; none of it may raise."""
    experiment, config = request.experiment, request.config
    resources = experiment.resources_needed
    assert resources.ram_bytes >= 0 and resources.hdd_bytes >= 0 and resources.gpu_mem_bytes >= 0
    assert resources.cards >= 0
    assert experiment.key.strip() and "/" not in experiment.key
    experiment.max_duration_seconds  # noqa: B018
    config.lifetime_seconds  # noqa: B018
    config.save_frequency_seconds  # noqa: B018
    assert isinstance(request.project, str) and isinstance(config.project_id, str)
    assert time_limit(request, now=1_800_000_000.0).seconds <= HARD_CAP_SECONDS  # a number, never NaN
    assert checkpoint_period(request) > 0
    if experiment.artifacts:
        assert "workspace" in experiment.artifacts and experiment.filename
    for label, artifact in experiment.artifacts.items():
        if artifact.qualified:
            location = artifact.location
            assert location.scheme == "file" or (location.bucket and location.key)
            request.aws_credentials(label)
    json.dumps(request.redacted())
    groom(experiment.pythonenv, config.pip)  # every attempt grooms the requirement lines first


def tally(outcome: str) -> None:
    """Count the outcome in hypothesis's statistics (``--hypothesis-show-statistics``)."""
    if currently_in_test_context():
        event(outcome)


def decodes_or_refuses(body: bytes | str | dict[str, Any]) -> Request | None:
    """The decoder's only two endings; any other exception fails the property."""
    try:
        request = decode_request(body)
    except RequestError as error:
        assert str(error).strip(), "a refusal must say why"
        tally("refused")
        return None
    assert isinstance(request, Request)
    tally("decoded")
    usable(request)
    wire = request.to_wire()
    assert canonical(decode_request(copy.deepcopy(wire)).to_wire()) == canonical(wire)
    text = request.to_json()
    if len(text) <= MAX_REQUEST_BYTES:  # defaults filled in can take a body just under the limit over it
        assert canonical(decode_request(text).to_wire()) == canonical(wire)
        assert canonical(decode_request(text.encode()).to_wire()) == canonical(wire)
    return request


# --- strategies -------------------------------------------------------------------------------------
json_values = json_documents(text_size=20, key_size=10, leaves=12)
EXPERIMENT_KEYS = ["key", "filename", "args", "pythonver", "pythonenv", "artifacts", "resources_needed",
                   "max_duration", "time_added", "project"]  # fmt: skip
shaped = st.fixed_dictionaries(
    {
        "experiment": st.dictionaries(
            st.sampled_from(EXPERIMENT_KEYS) | st.text(max_size=6),
            json_values | st.sampled_from(HOSTILE),
            max_size=6,
        )
        | json_values
    },
    optional={"config": json_values | st.sampled_from(HOSTILE)},
)
mutations = st.lists(
    st.tuples(
        st.integers(0, 2), st.integers(0, 10_000), st.integers(0, len(HOSTILE) - 1), st.integers(0, 100)
    ),
    min_size=1,
    max_size=3,
)


@PROPERTY
@given(body=st.binary(max_size=2000))
def test_arbitrary_bytes_decode_or_are_refused(body: bytes) -> None:
    decodes_or_refuses(body)


@PROPERTY
@given(document=json_values | shaped, form=st.sampled_from(FORMS))
def test_arbitrary_json_decodes_or_is_refused(document: Any, form: str) -> None:
    decodes_or_refuses(body_for(document, form, None, None))


@PROPERTY
@given(
    template=st.integers(0, len(TEMPLATES) - 1),
    changes=mutations,
    form=st.sampled_from(FORMS),
    size=st.sampled_from(SIZES),
    cut=st.none() | st.none() | st.none() | st.integers(0, 10_000),
)
def test_mutated_client_requests_decode_or_are_refused(
    template: int, changes: list[tuple[int, int, int, int]], form: str, size: int | None, cut: int | None
) -> None:
    document = mutate(TEMPLATES[template], template, changes)
    request = decodes_or_refuses(body_for(document, form, size, cut))
    if size is not None and size > MAX_REQUEST_BYTES and form != "dict":
        assert request is None, "a body over the size limit is refused whatever it holds"


# Benign variation: every example is a valid request, so the round trip is exercised on each.
benign_values = st.sampled_from(
    ["", "x", "3.11", "1h", "2g", "16GiB", 0, 1, 2.0, None, [], {}, ["a"], {"a": 1}]
)


@PROPERTY
@given(
    template=st.integers(0, len(TEMPLATES) - 1),
    extras=st.dictionaries(
        st.sampled_from([*NEW_KEYS[:2], "owner", "info", "status", "z"]), benign_values, max_size=3
    ),
    key=st.text(
        st.characters(blacklist_categories=["Cc", "Cs"], blacklist_characters="/"), min_size=1, max_size=40
    ),
    form=st.sampled_from(["str", "bytes", "dict"]),
)
def test_valid_requests_re_encode_to_the_same_wire_document(
    template: int, extras: dict[str, Any], key: str, form: str
) -> None:
    document = copy.deepcopy(TEMPLATES[template])
    document["experiment"].update(extras)
    document["experiment"]["key"] = key
    request = decodes_or_refuses(body_for(document, form, None, None))
    if key.strip() and key not in (".", ".."):
        assert request is not None and request.key == key
        wire = request.to_wire()
        for name, value in extras.items():
            if name not in ("experiment", "config", "key"):
                assert canonical(wire["experiment"][name]) == canonical(value)


# --- redaction ----------------------------------------------------------------------------------
# Where a credential can sit in a request, and the form it takes there; TOKEN is the secret.
SECRET_SLOTS: list[tuple[tuple[str, ...], str]] = [
    (("experiment", "artifacts", "workspace", "credentials", "aws", "secret_access_key"), "TOKEN"),
    (("experiment", "artifacts", "workspace", "credentials", "aws", "secret_key"), "TOKEN"),
    (("experiment", "artifacts", "workspace", "credentials", "aws", "access_key"), "TOKEN"),
    (("experiment", "artifacts", "output", "credentials", "aws", "secret_access_key"), "TOKEN"),
    (("experiment", "artifacts", "workspace", "qualified"), "s3://AKIAEXAMPLE:TOKEN@127.0.0.1:8333/b/ws.tar"),
    (("experiment", "artifacts", "workspace", "qualified"), "ftp://AKIAEXAMPLE:TOKEN@127.0.0.1/b/ws.tar"),
    (("experiment", "artifacts", "workspace", "qualified"), "s3://AKIAEXAMPLE:TOKEN@127.0.0.1:8333/only"),
    (("experiment", "pythonenv"), ["git+https://oauth2:TOKEN@github.com/org/repo.git"]),
    (("experiment", "info", "password"), "TOKEN"),
    (("experiment", "info", "password"), "NUMBER"),
    (("experiment", "resources_needed", "api_key"), "TOKEN"),
    (("config", "env", "AWS_SECRET_ACCESS_KEY"), "TOKEN"),
    (("config", "env", "AWS_ACCESS_KEY_ID"), "TOKEN"),
    (("config", "env", "AWS_SESSION_TOKEN"), "TOKEN"),
    (("config", "env", "DB_PASSWORD"), "NUMBER"),
    (("config", "env", "DATABASE_URL"), "postgres://app:TOKEN@db:5432/x"),
    (("config", "storage", "credentials", "aws", "secret_access_key"), "TOKEN"),
    (("config", "storage", "credentials", "aws", "access_key"), "TOKEN"),
    (("config", "database", "credentials", "aws", "secret_access_key"), "TOKEN"),
    (("config", "database", "apiKey"), "TOKEN"),
    (("config", "database", "private_key"), "NUMBER"),
    (("config", "cloud", "queue", "rmq"), "amqp://guest:TOKEN@127.0.0.1:5672/%2f"),
    (("config", "pip"), ["--index-url", "https://build:TOKEN@pypi.example/simple", "numpy"]),
]
tokens = st.text(
    alphabet="ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789-._~!$&'()*+,;=:",
    min_size=6,
    max_size=24,
).map(lambda text: "Zq9" + text)  # no secret is a substring of the templates' own text
numbers = st.integers(min_value=10**11, max_value=10**12 - 1).map(lambda n: n * 10 + 7)


def place(document: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        child = document.get(part)
        if not isinstance(child, dict):
            child = document[part] = {}
        document = child
    document[path[-1]] = value


def filled(form: Any, token: str, number: int) -> Any:
    if form == "NUMBER":
        return number
    if isinstance(form, list):
        return [filled(item, token, number) for item in form]
    return form.replace("TOKEN", token)


@PROPERTY
@given(
    template=st.integers(0, len(TEMPLATES) - 1),
    slots=st.lists(st.integers(0, len(SECRET_SLOTS) - 1), min_size=1, max_size=4, unique=True),
    secrets=st.lists(tokens, min_size=4, max_size=4),
    number=numbers,
    changes=st.lists(mutations, max_size=1),
)
def test_redaction_never_leaks_a_credential(
    template: int, slots: list[int], secrets: list[str], number: int, changes: list[Any]
) -> None:
    document = copy.deepcopy(TEMPLATES[template])
    document["experiment"].setdefault("filename", "train.py")
    for changes_ in changes:
        document = mutate(document, template, changes_)
    placed: list[str] = []
    for slot, token in zip(slots, secrets, strict=False):
        path, form = SECRET_SLOTS[slot]
        if isinstance(document.get(path[0]), dict) or path[0] not in document:
            place(document, path, filled(form, token, number))
            placed.append(str(number) if form == "NUMBER" else token)
    try:
        request = decode_request(encode(document))
    except RequestError as error:
        event("refused")
        text = str(error)
    else:
        event("decoded")
        redacted = request.redacted()
        text = json.dumps(redacted) + json.dumps(redacted, ensure_ascii=False)
        assert REDACTED in text or not placed
    for secret in placed:
        assert secret not in text and quote(secret) not in text, f"{secret!r} leaked"


# --- found by the properties above; kept as plain examples ------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        '{"experiment": {"key": "k", "resources_needed": {"ram": "%s"}}}' % ("9" * 400),
        '{"experiment": {"key": "k", "resources_needed": {"hdd": 1e999}}}',
        '{"experiment": {"key": "k", "resources_needed": {"gpuMem": -1e999}}}',
        '{"experiment": {"key": "k", "extra": %s}}' % ("1" * 5000),
        '{"experiment": {"key": "k", "extra": %s}}' % ("[" * 100_000 + "]" * 100_000),
        '{"experiment": {"key": "k", "extra": %s}}' % ("[" * 300 + "]" * 300),  # valid, but not re-encodable
        '{"experiment": {"key": "k", "filename": "a.py", "artifacts": {"workspace": {"qualified": "s3://h/b/k"}}},'
        ' "config": {"storage": {"credentials": {"aws": {"access_key": 1, "secret_access_key": "s"}}}}}',
    ],
)
def test_inputs_that_used_to_crash_the_decoder_are_refused_with_a_reason(body: str) -> None:
    with pytest.raises(RequestError) as refused:
        decode_request(body)
    assert str(refused.value)


def test_megabyte_fields_are_read_in_linear_time() -> None:
    """Each of these took hours before (a regular expression rescanning from every character);
    the module's timeout is what catches a regression."""
    body = copy.deepcopy(TEMPLATES[0])
    body["experiment"]["max_duration"] = "9" * 1_000_000  # unparseable: ignored, as upstream did
    body["experiment"]["pythonenv"] = [" " * 1_000_000 + "# a comment"]
    body["config"] = {"env": {"LONG": "x" * 1_000_000 + "://u:secret@h"}}
    request = decodes_or_refuses(json.dumps(body))
    assert request is not None and request.experiment.max_duration_seconds is None
    assert request.redacted()["config"]["env"]["LONG"].endswith("://u:***@h")


def test_storage_credentials_that_are_not_an_object_are_ignored_not_a_crash() -> None:
    artifact = {"qualified": "s3://h/b/k"}
    for credentials in ("flat", [], {"aws": "flat"}, {"aws": None}):
        body = {
            "experiment": {"key": "k", "filename": "a.py", "artifacts": {"workspace": artifact}},
            "config": {"storage": {"credentials": credentials}},
        }
        assert decode_request(body).aws_credentials("workspace") is None  # the runner's own chain


def test_a_refusal_never_quotes_a_url_password() -> None:
    body = {"experiment": {"key": "k", "filename": "a.py", "artifacts": {"workspace": {"qualified": ""}}}}
    for uri in ("ftp://AKIA:hunter2secret@h/b/k", "s3://AKIA:hunter2secret@h/bucket-only"):
        body["experiment"]["artifacts"]["workspace"]["qualified"] = uri
        with pytest.raises(RequestError) as refused:
            decode_request(body)
        assert "hunter2secret" not in str(refused.value) and "AKIA:***@" in str(refused.value)
