"""The StudioML experiment request: the one definition of the wire format in this repository.

Decoding is lenient in the ways real clients need (unknown keys kept, numbers sent as
strings, ``secret_key`` for ``secret_access_key``, ``null`` for empty lists) and strict where
a mistake would otherwise surface deep inside a run: a request that cannot run is refused
here with a reason a person can act on.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import unquote, urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from .s3_uris import parse_qualified_s3_uri, qualified_s3_uri
from .units import parse_duration, parse_size

MAX_REQUEST_BYTES = 4 * 1024 * 1024
"""Largest message body accepted; real requests are a few KiB even with a full ``pip freeze``."""

MAX_NESTING = 64
"""Deepest JSON nesting accepted. Real requests nest six levels; pydantic cannot re-encode a model
past about 250, and ``redact`` recurses, so a deeper document is refused rather than half-usable."""

MAX_KEY_LENGTH = 512
_KEY_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f]")
_LABEL = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class RequestError(ValueError):
    """The message is not a runnable StudioML request; retrying it cannot help."""


def _none_as(default_factory):
    """Go decodes JSON ``null`` into the zero value; so do we."""

    def convert(value: Any) -> Any:
        return default_factory() if value is None else value

    return BeforeValidator(convert)


def _count(value: Any) -> Any:
    """Counts arrive as numbers or numeric strings (``"gpuCount": "1"`` in the upstream docs)."""
    if value is None or value == "":
        return 0
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Count = Annotated[int, BeforeValidator(_count), Field(ge=0, le=1_000_000)]
StrList = Annotated[list[str], _none_as(list)]


class _Wire(BaseModel):
    """Base for wire objects: unknown keys are kept so a decoded request re-encodes whole."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, serialize_by_alias=True)


class AwsCredentials(_Wire):
    access_key: str = ""
    secret_access_key: str = Field("", validation_alias=AliasChoices("secret_access_key", "secret_key"))
    region: str | None = None

    @property
    def anonymous(self) -> bool:
        return not self.access_key and not self.secret_access_key


class Credentials(_Wire):
    aws: AwsCredentials | None = None


class Artifact(_Wire):
    qualified: str = ""
    bucket: str = ""
    key: str = ""
    mutable: bool = False
    unpack: bool = False
    local: str | None = None
    hash: str | None = None
    credentials: Credentials | None = None
    save_frequency: int | None = Field(None, alias="saveFrequency")

    @property
    def location(self) -> ArtifactLocation:
        return ArtifactLocation.parse(self.qualified, bucket=self.bucket, key=self.key)


class Resources(_Wire):
    cpus: Count = 0
    gpus: Count = 0
    gpu_count: Count = Field(0, alias="gpuCount")
    ram: Annotated[str, _none_as(str)] = ""
    hdd: Annotated[str, _none_as(str)] = ""
    gpu_mem: Annotated[str, _none_as(str)] = Field("", alias="gpuMem")

    @field_validator("ram", "hdd", "gpu_mem", mode="before")
    @classmethod
    def _size_text(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # int() would raise OverflowError, which pydantic lets through
                raise ValueError(f"size {value} is not a finite number")
            return str(int(value))
        return value

    @field_validator("ram", "hdd", "gpu_mem")
    @classmethod
    def _size_parses(cls, value: str) -> str:
        if value:
            parse_size(value)
        return value

    @property
    def ram_bytes(self) -> int:
        return parse_size(self.ram) if self.ram else 0

    @property
    def hdd_bytes(self) -> int:
        return parse_size(self.hdd) if self.hdd else 0

    @property
    def gpu_mem_bytes(self) -> int:
        return parse_size(self.gpu_mem) if self.gpu_mem else 0

    @property
    def cards(self) -> int:
        """Whole GPU cards wanted: none without ``gpus`` or ``gpuMem`` (upstream rule), else
        ``gpuCount`` or 1 (upstream silently allocated no card for ``gpus>0, gpuCount=0``)."""
        if self.gpus == 0 and not self.gpu_mem_bytes:
            return 0
        return self.gpu_count or 1


class Experiment(_Wire):
    key: str
    filename: Annotated[str, _none_as(str)] = ""
    args: StrList = []
    pythonver: Annotated[str, _none_as(str)] = ""
    pythonenv: StrList = []
    artifacts: Annotated[dict[str, Artifact], _none_as(dict)] = {}
    resources_needed: Annotated[Resources, _none_as(Resources)] = Field(default_factory=Resources)
    max_duration: str | None = None
    time_added: float | None = None
    project: Any = None

    @field_validator("key")
    @classmethod
    def _key_is_usable(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("experiment key is empty")
        if len(value) > MAX_KEY_LENGTH:
            raise ValueError(f"experiment key is longer than {MAX_KEY_LENGTH} characters")
        if _KEY_FORBIDDEN.search(value) or "/" in value or value in (".", ".."):
            raise ValueError("experiment key contains '/', '..' or control characters")
        return value

    @field_validator("args", "pythonenv", mode="before")
    @classmethod
    def _scalars_as_text(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in value]
        return value

    @field_validator("pythonver", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @field_validator("artifacts")
    @classmethod
    def _labels_are_names(cls, value: dict[str, Artifact]) -> dict[str, Artifact]:
        for label in value:
            if not _LABEL.match(label) or label in (".", ".."):
                raise ValueError(f"artifact label {label!r} is not a plain name")
        return value

    @field_validator("max_duration", mode="before")
    @classmethod
    def _duration_text(cls, value: Any) -> Any:
        return None if value in ("", None) else value

    @field_validator("time_added", mode="before")
    @classmethod
    def _time_number(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return None
        return value

    @property
    def max_duration_seconds(self) -> float | None:
        """Per-attempt limit; an unparseable value is ignored, as upstream did."""
        return _optional_duration(self.max_duration)


class Config(_Wire):
    experiment_lifetime: str | None = Field(None, alias="experimentLifetime")
    save_workspace_frequency: str | None = Field(None, alias="saveWorkspaceFrequency")
    env: Annotated[dict[str, str], _none_as(dict)] = {}
    pip: StrList = []
    database: Annotated[dict[str, Any], _none_as(dict)] = {}
    storage: dict[str, Any] | None = None

    @field_validator("env", mode="before")
    @classmethod
    def _env_values_as_text(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {
                str(k): "" if v is None else (json.dumps(v) if isinstance(v, (dict, list)) else str(v))
                for k, v in value.items()
            }
        return value

    @property
    def lifetime_seconds(self) -> float | None:
        return _optional_duration(self.experiment_lifetime)

    @property
    def save_frequency_seconds(self) -> float | None:
        return _optional_duration(self.save_workspace_frequency)

    @property
    def project_id(self) -> str:
        return str(self.database.get("projectId") or "")


class Request(_Wire):
    experiment: Experiment
    config: Annotated[Config, _none_as(Config)] = Field(default_factory=Config)

    @property
    def key(self) -> str:
        return self.experiment.key

    @property
    def project(self) -> str:
        return str(self.experiment.project or self.config.project_id or "")

    def to_wire(self) -> dict[str, Any]:
        """The JSON document a StudioML client would have sent."""
        return self.model_dump(mode="json", exclude_unset=False)

    def to_json(self) -> str:
        return json.dumps(self.to_wire(), separators=(",", ":"))

    def aws_credentials(self, label: str) -> AwsCredentials | None:
        """Keys for one artifact: its own block, else the request's env, else its storage config.

        ``None`` means the request names no keys at all and the runner's own credential chain
        (environment, mounted secret, instance role) applies. The CompletionService client sends
        artifacts without a credentials block, so the fallbacks are not optional.
        """
        artifact = self.experiment.artifacts[label]
        if artifact.credentials and artifact.credentials.aws is not None:
            return artifact.credentials.aws
        env = self.config.env
        if env.get("AWS_ACCESS_KEY_ID") or env.get("AWS_SECRET_ACCESS_KEY"):
            return AwsCredentials(
                access_key=env.get("AWS_ACCESS_KEY_ID", ""),
                secret_access_key=env.get("AWS_SECRET_ACCESS_KEY", ""),
                region=env.get("AWS_DEFAULT_REGION") or None,
            )
        storage_credentials = (self.config.storage or {}).get("credentials")
        storage_aws = storage_credentials.get("aws") if isinstance(storage_credentials, dict) else None
        if isinstance(storage_aws, dict) and (
            storage_aws.get("access_key") or storage_aws.get("secret_access_key")
        ):
            return AwsCredentials.model_validate(storage_aws)
        return None

    def redacted(self) -> dict[str, Any]:
        """The request with every secret replaced, safe for logs and metadata documents."""
        return redact(self.to_wire())


@dataclass(frozen=True)
class ArtifactLocation:
    """Where an artifact lives: ``s3://host[:port]/bucket/key`` or ``file:///path``."""

    scheme: str
    host: str
    bucket: str
    key: str

    @classmethod
    def parse(cls, qualified: str, *, bucket: str = "", key: str = "") -> ArtifactLocation:
        parts = urlsplit(qualified)
        scheme = parts.scheme.lower()
        if scheme == "file":
            path = unquote(parts.path)
            return cls(scheme="file", host="", bucket="", key=key or path)
        scheme, host, derived_bucket, derived_key = parse_qualified_s3_uri(qualified)
        location = cls(scheme=scheme, host=host, bucket=bucket or derived_bucket, key=key or derived_key)
        if not location.bucket or not location.key:
            raise ValueError(f"artifact URI {qualified!r} names no bucket and key")
        return location

    @property
    def uri(self) -> str:
        if self.scheme == "file":
            return f"file://{self.key}"
        return qualified_s3_uri(self.host, self.bucket, self.key)


def _optional_duration(text: str | None) -> float | None:
    if not text:
        return None
    try:
        seconds = parse_duration(text)
    except ValueError:
        return None
    return seconds if seconds > 0 else None


def parse_message(body: bytes | str | dict[str, Any]) -> dict[str, Any]:
    """A message body as a JSON object (clear request or envelope), or RequestError saying why not."""
    if isinstance(body, dict):
        return body
    if len(body) > MAX_REQUEST_BYTES:
        raise RequestError(f"message is {len(body)} bytes, over the {MAX_REQUEST_BYTES} byte limit")
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        # ValueError covers integers past Python's digit limit; RecursionError, deep nesting
        raise RequestError(f"message body is not JSON: {str(error)[:200]}") from None
    if not isinstance(document, dict):
        raise RequestError(f"message body is a JSON {type(document).__name__}, not an object")
    return document


def decode_request(body: bytes | str | dict[str, Any]) -> Request:
    """A clear-text request from a message body, or RequestError saying what is wrong."""
    document = parse_message(body)
    if _deeper_than(document, MAX_NESTING):
        raise RequestError(f"message nests JSON deeper than {MAX_NESTING} levels")
    if is_envelope(document):
        raise RequestError("message is an encrypted envelope; decrypt it before decoding")
    if "experiment" not in document:
        raise RequestError("message has no 'experiment' object")
    try:
        request = Request.model_validate(document)
    except ValidationError as error:
        raise RequestError(_describe(error)) from None
    _check_runnable(request)
    return request


def _deeper_than(document: Any, limit: int) -> bool:
    """Whether objects and arrays nest more than ``limit`` levels; iterative, so any depth is safe."""
    stack = [(document, 1)]
    while stack:
        node, level = stack.pop()
        if level > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return False


def is_envelope(document: Any) -> bool:
    """Encrypted messages wrap their payload as ``{"message": {"payload": ...}}``."""
    return (
        isinstance(document, dict)
        and isinstance(document.get("message"), dict)
        and "payload" in document["message"]
    )


def _check_runnable(request: Request) -> None:
    experiment = request.experiment
    artifacts = experiment.artifacts
    for label, artifact in artifacts.items():
        if not artifact.qualified:
            continue
        try:
            artifact.location  # noqa: B018 - parsing is the check
            request.aws_credentials(label)  # the keys its transfers will use must be well-formed
        except ValidationError as error:
            raise RequestError(f"artifact {label!r}: credentials: {_describe(error)}") from None
        except ValueError as error:
            # the message quotes the URI, which may carry a password
            raise RequestError(f"artifact {label!r}: {redact(str(error))}") from None
    if artifacts and "workspace" not in artifacts:
        raise RequestError("request has artifacts but no 'workspace' artifact to run")
    if "workspace" in artifacts and not experiment.filename:
        raise RequestError("request names no 'filename' to run in its workspace")


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item["loc"]) or "request"
        problems.append(f"{where}: {item['msg']}")
    more = error.error_count() - len(problems)
    return "invalid request: " + "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")


_SECRET_NAME = re.compile(
    r"(secret|password|passwd|token|api_?key|private|credential|access_key)", re.IGNORECASE
)
_URL_PASSWORD = re.compile(
    # anchored on "://" alone: a scheme pattern in front made every letter of a long run start a
    # scan to the run's end (a megabyte string took hours); masking "://user:pass@" after any
    # prefix masks at least what a scheme-checked pattern did
    r"://(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@"
)
REDACTED = "***"


def redact(value: Any, name: str = "") -> Any:
    """Mask values under secret-looking names and passwords inside URLs, recursively."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, name) for v in value]
    if isinstance(value, str):
        if value and _SECRET_NAME.search(name):
            return REDACTED
        return _URL_PASSWORD.sub(lambda m: f"://{m['user']}:{REDACTED}@", value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and _SECRET_NAME.search(name):
        return REDACTED  # a PIN or numeric key is a secret too
    return value
