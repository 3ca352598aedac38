"""The base of the flows' parameter models (the Prefect forms) and of the
configs nested in them: an unknown key is an error that names it.

pydantic drops unknown keys by default, so a misspelt field, or a key such as
``profile`` that no model reads, would leave a run on the defaults without a
word. Here such a key fails validation, in the CLI, in a deployment's run (the
flow validates its parameters) and, through the form's schema
(``additionalProperties: false``), on the server. Pydantic only: the `gear`
CLI imports this without loading a stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

# Profiles are resolved before a model sees its input (flows/params.py: resolve_params).
PROFILE_KEY_HINT = (
    "a profile is applied by the CLI (`gear <command> --profile demo`) and written "
    "out in prefect.yaml's deployments; pass the values themselves (`gear <command> --profile demo --dry-run` "
    "prints them)"
)


class ParamsModel(BaseModel):
    """A parameter model that refuses keys it has no field for."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _refuse_a_profile_key(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "profile" in data and "profile" not in cls.model_fields:
            raise ValueError(f"'profile' is not a parameter: {PROFILE_KEY_HINT}")
        return data


__all__ = ["PROFILE_KEY_HINT", "ParamsModel"]
