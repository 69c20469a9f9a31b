"""Turn pydantic validation errors into the one-line messages the CLI prints."""

from __future__ import annotations

from typing import Any, TypeVar

import pydantic

from makd.errors import MakdError

M = TypeVar("M", bound=pydantic.BaseModel)


def one_line(exc: pydantic.ValidationError, where: str) -> str:
    """`where: loc.path: message` for the first error (the rest are usually consequences)."""
    err = exc.errors()[0]
    loc = ".".join(str(part) for part in err["loc"])
    loc = f"{loc}: " if loc else ""
    msg = err["msg"].removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    value = f" (got {err['input']!r})" if err.get("type") != "missing" and not isinstance(err.get("input"), dict) else ""
    return f"{where}: {loc}{msg}{value}{more}"


def validate(model: type[M], data: Any, where: str) -> M:
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise MakdError(one_line(exc, where)) from None
