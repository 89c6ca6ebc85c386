"""The control plane: AWS JSON 1.1 operations of ``IoTSecuredTunneling`` (PROTOCOL.md 6).

``ControlPlane.call(operation, params)`` runs one operation on the ``Store`` and returns
its output dict or raises ``ApiError``; ``ControlPlane.handle_http`` wraps it in the
HTTP exchange boto3 and the aws CLI make (``POST /`` with ``X-Amz-Target``). SigV4
signatures are accepted without being verified: the emulator has no credentials.

Error codes: the model declares ``ResourceNotFoundException`` and
``LimitExceededException``; input breaking the model's constraints gets
``ValidationException`` (what AWS JSON services answer, and what botocore shows as
the ClientError code), a rule of the API beyond the model (``destinationConfig``
with ``SOURCE``, duplicate services, a bad ``nextToken``, rotating a closed tunnel)
gets ``InvalidRequestException``; a body that is not JSON, or a member of the wrong
JSON type, ``SerializationException``; an unknown ``X-Amz-Target``
``UnknownOperationException``. All are HTTP 400; nothing a client sends yields a 500.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import uuid
from email.utils import formatdate
from typing import Any, Callable

from localproxy.emulator.shapes import NEXT_TOKEN_RE, THING_NAME_RE, Validator
from localproxy.emulator.store import ApiError, Store
from localproxy.ops.json_limits import JsonRefused, loads_bounded

logger = logging.getLogger("localproxy.emulator.api")

TARGET_PREFIX = "IoTSecuredTunneling."
JSON_CONTENT_TYPE = "application/x-amz-json-1.1"
DEFAULT_MAX_RESULTS = 100
# The model's deepest input is 3 levels (tags: a list of objects); AWS's JSON
# parsers refuse deep nesting with a SerializationException too.
MAX_BODY_DEPTH = 32

HttpReply = tuple[int, list[tuple[str, str]], bytes]


class ControlPlane:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._operations: dict[str, Callable[[Validator], dict[str, Any]]] = {
            "OpenTunnel": self._open_tunnel,
            "CloseTunnel": self._close_tunnel,
            "DescribeTunnel": self._describe_tunnel,
            "ListTunnels": self._list_tunnels,
            "RotateTunnelAccessToken": self._rotate,
            "TagResource": self._tag_resource,
            "UntagResource": self._untag_resource,
            "ListTagsForResource": self._list_tags,
        }

    @property
    def operations(self) -> list[str]:
        return sorted(self._operations)

    def call(self, operation: str, params: Any) -> dict[str, Any]:
        handler = self._operations.get(operation)
        if handler is None:
            raise ApiError("UnknownOperationException", f"Unknown operation {operation!r}")
        return handler(Validator(params))

    # --- HTTP -----------------------------------------------------------------

    def handle_http(self, method: str, path: str, headers: dict[str, str], body: bytes) -> HttpReply:
        """One request of the control API; ``headers`` has lower-case names."""
        request_id = str(uuid.uuid4())
        try:
            if method != "POST":
                raise ApiError("UnknownOperationException", f"The control API takes POST /, not {method}", 405)
            if path.split("?", 1)[0] != "/":
                raise ApiError("UnknownOperationException", f"The control API is served at POST /, not {path}", 404)
            target = headers.get("x-amz-target", "")
            operation = target[len(TARGET_PREFIX) :] if target.startswith(TARGET_PREFIX) else ""
            if operation not in self._operations:
                shown = target or "(no X-Amz-Target header)"
                raise ApiError("UnknownOperationException", f"Unknown operation {shown!r}")
            try:
                params = loads_bounded(body, MAX_BODY_DEPTH) if body.strip() else {}
            except JsonRefused as error:  # json.loads would raise RecursionError: a 400, as AWS answers
                raise ApiError("SerializationException", f"The request body is refused: {error}") from None
            except (UnicodeDecodeError, ValueError) as error:
                raise ApiError("SerializationException", f"The request body is not valid JSON: {error}") from None
            output = self.call(operation, params)
        except ApiError as error:
            logger.info("control API %s -> %s: %s", headers.get("x-amz-target", method), error.code, error.message)
            payload = json.dumps({"__type": error.code, "message": error.message}).encode()
            return error.status, _headers(request_id, payload, error.code), payload
        logger.debug("control API %s -> 200", operation)
        payload = json.dumps(output).encode()
        return 200, _headers(request_id, payload), payload

    # --- operations -----------------------------------------------------------

    def _open_tunnel(self, v: Validator) -> dict[str, Any]:
        description = v.description()
        tags = v.tag_list()
        destination = v.destination_config()
        lifetime = None
        timeout = v.structure(v.params, "timeoutConfig", "timeoutConfig")
        if timeout is not None:
            lifetime = v.integer(
                timeout, "maxLifetimeTimeoutMinutes", "timeoutConfig.maxLifetimeTimeoutMinutes", minimum=1, maximum=720
            )
        v.done()
        tunnel = self.store.open_tunnel(
            services=destination[0] if destination else None,
            thing_name=destination[1] if destination else None,
            lifetime_minutes=lifetime or 720,
            description=description,
            tags=dict(tags or []),
        )
        return {
            "tunnelId": tunnel.tunnel_id,
            "tunnelArn": tunnel.tunnel_arn,
            "sourceAccessToken": tunnel.tokens["source"].value,
            "destinationAccessToken": tunnel.tokens["destination"].value,
        }

    def _close_tunnel(self, v: Validator) -> dict[str, Any]:
        tunnel_id = v.tunnel_id()
        delete = v.boolean(v.params, "delete", "delete")
        v.done()
        self.store.close(tunnel_id, delete=bool(delete))
        return {}

    def _describe_tunnel(self, v: Validator) -> dict[str, Any]:
        tunnel_id = v.tunnel_id()
        v.done()
        return {"tunnel": self.store.get(tunnel_id).describe()}

    def _list_tunnels(self, v: Validator) -> dict[str, Any]:
        thing = v.string(v.params, "thingName", "thingName", min_len=1, max_len=128, pattern=THING_NAME_RE)
        max_results = v.integer(v.params, "maxResults", "maxResults", minimum=1, maximum=100)
        next_token = v.string(v.params, "nextToken", "nextToken", pattern=NEXT_TOKEN_RE)
        v.done()
        tunnels = self.store.tunnels(thing)
        if next_token is not None:
            after = _decode_next_token(next_token)
            tunnels = [t for t in tunnels if t.seq < after]
        limit = max_results or DEFAULT_MAX_RESULTS
        page = tunnels[:limit]
        out: dict[str, Any] = {"tunnelSummaries": [t.summary() for t in page]}
        if len(tunnels) > limit:
            out["nextToken"] = _encode_next_token(page[-1].seq)
        return out

    def _rotate(self, v: Validator) -> dict[str, Any]:
        tunnel_id = v.tunnel_id()
        mode = v.enum(v.params, "clientMode", "clientMode", ("SOURCE", "DESTINATION", "ALL"))
        destination = v.destination_config()
        v.done()
        assert mode is not None
        tokens = self.store.rotate(
            tunnel_id,
            mode,
            services=destination[0] if destination else None,
            thing_name=destination[1] if destination else None,
        )
        return {"tunnelArn": self.store.get(tunnel_id).tunnel_arn, **tokens}

    def _tag_resource(self, v: Validator) -> dict[str, Any]:
        arn = v.resource_arn()
        tags = v.tag_list(required=True)
        v.done()
        self.store.tag(arn, tags or [])
        return {}

    def _untag_resource(self, v: Validator) -> dict[str, Any]:
        arn = v.resource_arn()
        keys: list[str] = []
        if v.required(v.params, "tagKeys", "tagKeys"):
            raw = v.array(v.params, "tagKeys", "tagKeys") or []
            if len(raw) > 200:
                v.fail(f"[{len(raw)} keys]", "tagKeys", "Member must have length less than or equal to 200")
            for index, item in enumerate(raw):
                if not isinstance(item, str):
                    raise ApiError("SerializationException", f"Expected a string for 'tagKeys.{index + 1}.member'")
                keys.append(v.tag_key({"k": item}, "k", f"tagKeys.{index + 1}.member") or "")
        v.done()
        self.store.untag(arn, keys)
        return {}

    def _list_tags(self, v: Validator) -> dict[str, Any]:
        arn = v.resource_arn()
        v.done()
        tunnel = self.store.by_arn(arn)
        return {"tags": [{"key": k, "value": value} for k, value in tunnel.tags.items()]}


def _encode_next_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"after:{seq}".encode()).decode()


def _decode_next_token(token: str) -> int:
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        label, _, number = text.partition(":")
        if label != "after":
            raise ValueError(label)
        return int(number)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ApiError("InvalidRequestException", "Invalid nextToken: use the nextToken of a previous ListTunnels") from None


def _headers(request_id: str, payload: bytes, error_type: str | None = None) -> list[tuple[str, str]]:
    headers = [
        ("x-amzn-RequestId", request_id),
        ("Content-Type", JSON_CONTENT_TYPE),
        ("Content-Length", str(len(payload))),
        ("Date", formatdate(usegmt=True)),
    ]
    if error_type is not None:
        headers.append(("x-amzn-ErrorType", error_type))
    return headers
