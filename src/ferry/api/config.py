"""The API server's configuration: a TOML file, validated by pydantic (unknown keys are named).

Example::

    default_project = "admin"          # used only in --noauth mode

    [[tokens]]
    token = "s3cret-admin"
    project_id = "admin"
    user = "admin"
    roles = ["admin"]

    [[tokens]]
    token = "s3cret-alice"
    project_id = "demo"
    user = "alice"
    roles = ["member"]
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ferry.store.base import check_name


class ConfigError(ValueError):
    """A configuration file that cannot be read or does not validate."""


class TokenConfig(BaseModel):
    """One accepted X-Auth-Token and who presents it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    token: str = Field(min_length=8, description="The X-Auth-Token value.")
    project_id: str = Field(description="The project the token acts in.")
    user: str = Field(min_length=1)
    roles: tuple[Literal["admin", "member"], ...] = Field(default=("member",), min_length=1)

    @field_validator("project_id")
    @classmethod
    def _plain(cls, v: str) -> str:
        return check_name("project_id", v)

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles


class ApiConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    default_project: str = Field(default="admin", description="The project of --noauth mode.")
    tokens: tuple[TokenConfig, ...] = ()

    @field_validator("tokens")
    @classmethod
    def _unique(cls, v: tuple[TokenConfig, ...]) -> tuple[TokenConfig, ...]:
        seen = [t.token for t in v]
        if len(seen) != len(set(seen)):
            raise ValueError("the same token is listed twice")
        return v

    def token(self, value: str) -> TokenConfig | None:
        return next((t for t in self.tokens if t.token == value), None)


def load_config(path: Path) -> ApiConfig:
    """Read and validate a TOML config; errors name the file, the key and the reason."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    try:
        return ApiConfig.model_validate(data)
    except ValidationError as e:
        msgs = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"{path}: " + "; ".join(msgs)) from None
