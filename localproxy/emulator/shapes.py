"""Input validation of the control API, after the botocore model of ``iotsecuretunneling``.

A JSON value of the wrong type is a ``SerializationException`` (what AWS JSON services
answer); a value breaking a length, range, pattern or enum constraint, or a missing
required member, is a ``ValidationException`` whose message follows the AWS style
(``1 validation error detected: Value ... at 'x' failed to satisfy constraint: ...``).
Unknown members are ignored, as AWS does.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from localproxy.emulator.store import ApiError

SERVICE_RE = re.compile(r"[a-zA-Z0-9:_-]+")
THING_NAME_RE = SERVICE_RE
TUNNEL_ID_RE = re.compile(r"[a-zA-Z0-9_\-+=:]{1,128}")
NEXT_TOKEN_RE = re.compile(r"[a-zA-Z0-9_=-]{1,4096}")
TAG_EXTRA_CHARS = frozenset("_.:/=+-@")


def _is_tag_char(char: str) -> bool:
    # ^([\p{L}\p{Z}\p{N}_.:/=+\-@]*)$ : letters, separators, numbers and a few marks.
    return char in TAG_EXTRA_CHARS or unicodedata.category(char)[0] in "LZN"


def _has_no_control(text: str) -> bool:
    # [^\p{C}]: no control, format, surrogate, private-use or unassigned characters.
    return all(unicodedata.category(char)[0] != "C" for char in text)


class Validator:
    """Collects constraint violations of one request, then raises them together."""

    def __init__(self, params: Any) -> None:
        if not isinstance(params, dict):
            raise ApiError("SerializationException", "The request body must be a JSON object")
        self.params: dict[str, Any] = params
        self.errors: list[str] = []

    def fail(self, value: Any, path: str, constraint: str) -> None:
        shown = "null" if value is None else str(value)
        if len(shown) > 100:
            shown = shown[:100] + "..."
        self.errors.append(f"Value '{shown}' at '{path}' failed to satisfy constraint: {constraint}")

    def done(self) -> None:
        if self.errors:
            count = len(self.errors)
            noun = "error" if count == 1 else "errors"
            raise ApiError("ValidationException", f"{count} validation {noun} detected: " + "; ".join(self.errors))

    # --- typed getters (None when absent) ---------------------------------------

    def _typed(self, obj: dict[str, Any], name: str, path: str, kind: type | tuple[type, ...], label: str) -> Any:
        value = obj.get(name)
        if value is None:
            return None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ApiError("SerializationException", f"Expected {label} for '{path}', got {type(value).__name__}")
        return value

    def required(self, obj: dict[str, Any], name: str, path: str) -> bool:
        if obj.get(name) is None:
            self.fail(None, path, "Member must not be null")
            return False
        return True

    def string(
        self,
        obj: dict[str, Any],
        name: str,
        path: str,
        *,
        min_len: int = 0,
        max_len: int | None = None,
        pattern: re.Pattern[str] | None = None,
        required: bool = False,
    ) -> str | None:
        if required and not self.required(obj, name, path):
            return None
        value: str | None = self._typed(obj, name, path, str, "a string")
        if value is None:
            return None
        if len(value) < min_len:
            self.fail(value, path, f"Member must have length greater than or equal to {min_len}")
        elif max_len is not None and len(value) > max_len:
            self.fail(value, path, f"Member must have length less than or equal to {max_len}")
        elif pattern is not None and not pattern.fullmatch(value):
            self.fail(value, path, f"Member must satisfy regular expression pattern: {pattern.pattern}")
        return value

    def integer(
        self, obj: dict[str, Any], name: str, path: str, *, minimum: int, maximum: int
    ) -> int | None:
        value: int | None = self._typed(obj, name, path, int, "an integer")
        if value is None:
            return None
        if value < minimum:
            self.fail(value, path, f"Member must have value greater than or equal to {minimum}")
        elif value > maximum:
            self.fail(value, path, f"Member must have value less than or equal to {maximum}")
        return value

    def boolean(self, obj: dict[str, Any], name: str, path: str) -> bool | None:
        value: bool | None = self._typed(obj, name, path, bool, "a boolean")
        return value

    def enum(self, obj: dict[str, Any], name: str, path: str, allowed: tuple[str, ...]) -> str | None:
        if not self.required(obj, name, path):
            return None
        value: str = self._typed(obj, name, path, str, "a string")
        if value not in allowed:
            self.fail(value, path, f"Member must satisfy enum value set: [{', '.join(allowed)}]")
            return None
        return value

    def structure(self, obj: dict[str, Any], name: str, path: str) -> dict[str, Any] | None:
        value: dict[str, Any] | None = self._typed(obj, name, path, dict, "an object")
        return value

    def array(self, obj: dict[str, Any], name: str, path: str) -> list[Any] | None:
        value: list[Any] | None = self._typed(obj, name, path, list, "an array")
        return value

    # --- the model's shapes -----------------------------------------------------

    def tunnel_id(self) -> str:
        return self.string(self.params, "tunnelId", "tunnelId", pattern=TUNNEL_ID_RE, required=True) or ""

    def description(self) -> str | None:
        value = self.string(self.params, "description", "description", min_len=1, max_len=2048)
        if value and len(value) <= 2048 and not _has_no_control(value):
            self.fail(value, "description", "Member must satisfy regular expression pattern: [^\\p{C}]{1,2048}")
        return value

    def destination_config(self) -> tuple[list[str], str | None] | None:
        config = self.structure(self.params, "destinationConfig", "destinationConfig")
        if config is None:
            return None
        thing = self.string(
            config, "thingName", "destinationConfig.thingName", min_len=1, max_len=128, pattern=THING_NAME_RE
        )
        services: list[str] = []
        if self.required(config, "services", "destinationConfig.services"):
            raw = self.array(config, "services", "destinationConfig.services") or []
            if not raw:
                self.fail("[]", "destinationConfig.services", "Member must have length greater than or equal to 1")
            for index, item in enumerate(raw):
                path = f"destinationConfig.services.{index + 1}.member"
                if not isinstance(item, str):
                    raise ApiError("SerializationException", f"Expected a string for '{path}'")
                services.append(
                    self.string({"s": item}, "s", path, min_len=1, max_len=128, pattern=SERVICE_RE) or ""
                )
        return services, thing

    def tag_list(self, name: str = "tags", required: bool = False) -> list[tuple[str, str]] | None:
        if required and not self.required(self.params, name, name):
            return None
        raw = self.array(self.params, name, name)
        if raw is None:
            return None
        if not 1 <= len(raw) <= 200:
            self.fail(f"[{len(raw)} tags]", name, "Member must have length between 1 and 200")
        tags: list[tuple[str, str]] = []
        for index, item in enumerate(raw):
            path = f"{name}.{index + 1}.member"
            if not isinstance(item, dict):
                raise ApiError("SerializationException", f"Expected an object for '{path}'")
            key = self.tag_key(item, "key", f"{path}.key", required=True)
            value = self.tag_value(item, f"{path}.value")
            if key is not None and value is not None:
                tags.append((key, value))
        keys = [key for key, _ in tags]
        if len(set(keys)) != len(keys):
            self.fail("[duplicate keys]", name, "Tag keys must be unique")
        return tags

    def tag_key(self, obj: dict[str, Any], name: str, path: str, required: bool = False) -> str | None:
        key = self.string(obj, name, path, min_len=1, max_len=128, required=required)
        if key and len(key) <= 128 and not all(map(_is_tag_char, key)):
            self.fail(key, path, "Member must satisfy regular expression pattern: ^([\\p{L}\\p{Z}\\p{N}_.:/=+\\-@]*)$")
        return key

    def tag_value(self, obj: dict[str, Any], path: str) -> str | None:
        value = self.string(obj, "value", path, max_len=256, required=True)
        if value and len(value) <= 256 and not all(map(_is_tag_char, value)):
            self.fail(value, path, "Member must satisfy regular expression pattern: ^([\\p{L}\\p{Z}\\p{N}_.:/=+\\-@]*)$")
        return value

    def resource_arn(self) -> str:
        return self.string(self.params, "resourceArn", "resourceArn", min_len=1, max_len=1011, required=True) or ""
