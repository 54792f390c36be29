"""A blocking JSON-RPC 2.0 client for Kamailio's jsonrpcs module over HTTP (xhttp).

Blocking on purpose: each endpoint's publisher runs it on a thread of its own, so a Kamailio
that hangs costs that thread its timeout and nothing else. The standard library's urllib is
enough for one POST per call; every call has a timeout.
"""

from __future__ import annotations

import itertools
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from balancer.ami.session import LOOPBACK_ONLY_ENV
from balancer.config_values import is_loopback
from balancer.errors import KamailioError


class KamailioFault(KamailioError):
    """Kamailio answered, with a JSON-RPC error (e.g. 500 "Ongoing reload")."""

    def __init__(self, where: str, method: str, code: int, message: str) -> None:
        super().__init__(f"{where}: {method}: error {code} {message}")
        self.code = code
        self.message = message


class KamailioRpc:
    """Calls one Kamailio's RPC commands (``dispatcher.list``, ``dispatcher.set_duid_state``...)."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.host = urllib.parse.urlsplit(url).hostname or ""
        self._ids = itertools.count(1)

    def call(self, method: str, *params: object) -> Any:
        """The command's result; KamailioFault when it answers an error, KamailioError else."""
        if os.environ.get(LOOPBACK_ONLY_ENV) and not is_loopback(self.host):
            raise KamailioError(
                f"{self.url}: refusing non-loopback {self.host} ({LOOPBACK_ONLY_ENV})"
            )
        body = json.dumps(
            {"jsonrpc": "2.0", "method": method, "params": list(params), "id": next(self._ids)}
        ).encode()
        request = urllib.request.Request(
            self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            # jsonrpcs answers a fault with an HTTP error status and the JSON-RPC error body.
            raw = exc.read()
            if not raw:
                raise KamailioError(f"{self.url}: {method}: HTTP {exc.code} {exc.reason}") from None
        except TimeoutError:
            raise KamailioError(
                f"{self.url}: {method}: no answer within {self.timeout_s:g}s"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise KamailioError(f"{self.url}: {method}: {reason}") from None
        try:
            reply = json.loads(raw)
        except ValueError:
            raise KamailioError(f"{self.url}: {method}: not a JSON-RPC answer") from None
        if not isinstance(reply, dict):
            raise KamailioError(f"{self.url}: {method}: not a JSON-RPC answer")
        error = reply.get("error")
        if isinstance(error, dict):
            raise KamailioFault(
                self.url, method, int(error.get("code", 0)), str(error.get("message", ""))
            )
        return reply.get("result")

    def list(self) -> Any:
        """``dispatcher.list``; an empty list when Kamailio has no sets loaded."""
        try:
            return self.call("dispatcher.list")
        except KamailioFault as exc:
            if "no destination sets" in exc.message.lower():
                return {"RECORDS": []}
            raise

    def up_since(self) -> str:
        """When this Kamailio started (``core.uptime``): a change means it was restarted."""
        result = self.call("core.uptime")
        return str(result.get("up_since", "")) if isinstance(result, dict) else ""
