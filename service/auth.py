"""API keys and roles: which role each path needs, and whether a key has it. Pure, no IO.

Roles: `predict` (inference and model metadata), `label` (the labeling queue), `admin` (exports,
the model repository; admin also holds every other role). Keys are stored only as their sha256
and compared in constant time. Keys are random tokens of 32 bytes (`new_api_key`), so a plain
sha256 cannot be reversed by guessing; a slow password hash would only slow every request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field, field_validator

Role = Literal["predict", "label", "admin"]
ROLES: tuple[Role, ...] = ("predict", "label", "admin")
# What a request needs: a role, any valid key, or nothing (open).
Requirement = Literal["predict", "label", "admin", "any", "open"]
ANY_KEY: Requirement = "any"
OPEN: Requirement = "open"

_MODEL = r"/models/[^/]+(?:/versions/[^/]+)?"
_RULE_TEXT: tuple[tuple[str | None, str, Requirement], ...] = (
    ("POST", rf"/v2{_MODEL}/infer", "predict"),
    ("POST", rf"/v1{_MODEL}/predict", "predict"),
    # Metadata (what is served, its classes) is needed by every role, the console included.
    ("GET", rf"/v2(?:{_MODEL}(?:/ready)?)?", ANY_KEY),
    ("GET", r"/v1/models", ANY_KEY),
    (None, rf"/v1{_MODEL}/queue/export(?:\.jsonl|/.*)", "admin"),
    (None, rf"/v1{_MODEL}/queue(?:/.*)?", "label"),
    ("GET", rf"/v1{_MODEL}/drift", ANY_KEY),
    (None, r"/v2/repository(?:/.*)?", "admin"),
    (None, r"/console(?:/.*)?", OPEN),
)
_RULES = tuple((method, re.compile(pattern), need) for method, pattern, need in _RULE_TEXT)
_OBSERVABILITY = re.compile(r"/v2/health/(?:live|ready)|/metrics|/docs.*|/redoc|/openapi\.json")


def required(method: str, path: str, protect_observability: bool = False) -> Requirement:
    """What `method path` needs. Health, metrics and docs are open unless protected; any other
    path not listed needs a valid key, so a new endpoint is never open by accident."""
    if _OBSERVABILITY.fullmatch(path):
        return ANY_KEY if protect_observability else OPEN
    for rule_method, pattern, requirement in _RULES:
        if (
            rule_method is None
            or rule_method == method
            or (method == "HEAD" and rule_method == "GET")
        ) and pattern.fullmatch(path):
            return requirement
    return ANY_KEY


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key() -> str:
    return "eh_" + secrets.token_urlsafe(32)


class ApiKey(BaseModel):
    """One configured key: who it is, the sha256 of the key, and its roles."""

    name: str = Field(min_length=1, max_length=128)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    roles: list[Role] = Field(min_length=1)

    @field_validator("sha256", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


@dataclass(frozen=True)
class Decision:
    allowed: bool
    status: int  # 200, 401 or 403
    message: str
    key_name: str | None = None


class KeyRing:
    def __init__(self, keys: list[ApiKey]) -> None:
        self._keys = [(bytes.fromhex(k.sha256), k) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def find(self, presented: str) -> ApiKey | None:
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for stored, key in self._keys:  # no early exit: the time does not tell which matched
            if hmac.compare_digest(stored, digest):
                found = key
        return found

    def decide(self, requirement: Requirement, presented: str | None) -> Decision:
        if requirement == OPEN or not self.enabled:
            return Decision(True, 200, "")
        if not presented:
            return Decision(
                False,
                401,
                "this endpoint needs an API key: send 'Authorization: Bearer <key>' or "
                "'X-API-Key: <key>'",
            )
        key = self.find(presented)
        if key is None:
            return Decision(False, 401, "the API key is not valid")
        if requirement == ANY_KEY or requirement in key.roles or "admin" in key.roles:
            return Decision(True, 200, "", key.name)
        return Decision(
            False,
            403,
            f"API key '{key.name}' has the roles {sorted(key.roles)}; this endpoint needs the "
            f"'{requirement}' role",
            key.name,
        )


def presented_key(headers: dict[str, str]) -> str | None:
    """The key from `Authorization: Bearer <key>` or `X-API-Key: <key>` (lower-case names)."""
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key") or None
