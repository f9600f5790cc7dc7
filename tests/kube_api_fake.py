"""A fake Kubernetes API server for one custom resource, over real HTTP.

No Kubernetes API server can run here (no cluster, no container engine, no
etcd), so the reconciler tests talk to this instead. It is a real HTTP/1.1
server, so the policy service uses the real ``kubernetes`` client unchanged
(kubeconfig, URL building, merge-patch content type, chunked watch streams,
``ERROR`` events and their ``ApiException``), and the tests drive it with the
same client, as ``kubectl`` would. ``tests/csi/kube_fake.py`` stands in for
``CoreV1Api`` in-process instead; it cannot serve another process.

It serves the subset of the API the client uses for one CRD (read from
``deploy/base/crd``), with the API server's semantics where the reconciler
depends on them:

* one ``resourceVersion`` counter for every change; ``metadata.generation``
  starts at 1 and grows when ``spec`` changes (never on a status write);
* the ``status`` subresource: ``PUT``/``PATCH`` of the object ignore ``status``,
  ``PATCH …/status`` changes only ``status``;
* validation against the CRD's schema (``crd_schema``): value errors and unknown
  fields are refused with ``422 Invalid``, as the API server does with
  ``fieldValidation=Strict`` (it would prune them otherwise);
* watches from a ``resourceVersion`` replay the event log after it and then
  stream new events until ``timeoutSeconds``; one from a version older than the
  log's start gets an ``ERROR`` event with ``410 Gone`` (``expire_watches``);
* every request is recorded (:class:`Request`), with its verb and resource in RBAC terms.

``lists_before`` answers lists as if taken before an object was created (the
window in which another client may already act on it).

Not served: label/field selectors, pagination, server-side apply, JSON patch,
``deletionTimestamp``/finalizers, discovery.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

from crd_schema import load_crd, storage_schema, validation_errors

#: Longest a watch stream stays open without ``timeoutSeconds``, seconds.
DEFAULT_WATCH_TIMEOUT_S = 1800


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch of ``target`` (not modified) with ``patch``."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class Request(NamedTuple):
    """One request the server answered.

    Attributes:
        verb: in RBAC terms: ``list``, ``watch``, ``get``, ``create``, ``update``,
            ``patch``, ``delete``.
        resource: ``interposerpolicies`` or ``interposerpolicies/status``.
        name: ``<namespace>/<name>`` of the object, ``""`` for the collection.
        agent: the ``User-Agent`` header.
    """

    verb: str
    resource: str
    name: str
    agent: str


class ApiError(Exception):
    """An API error answered as a ``Status`` object."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


class FakeApiServer:
    """The API of one namespaced custom resource (see the module docstring).

    Args:
        crd_path: the CRD manifest.

    Attributes:
        url: ``http://127.0.0.1:<port>``.
        requests: every request as a :class:`Request`, in arrival order.
    """

    def __init__(self, crd_path: Path | None = None) -> None:
        crd = load_crd(crd_path) if crd_path else load_crd()
        self.group = crd["spec"]["group"]
        self.plural = crd["spec"]["names"]["plural"]
        self.kind = crd["spec"]["names"]["kind"]
        (version,) = [v["name"] for v in crd["spec"]["versions"] if v["storage"]]
        self.version = version
        self.schema = storage_schema(crd)
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        #: ``(resourceVersion, type, object)``; versions after ``_log_start`` only.
        self.events: list[tuple[int, str, dict[str, Any]]] = []
        self.requests: list[Request] = []
        self._log_start = 0
        self._rv = 0
        #: (namespace, name) → resourceVersion it was created at (``lists_before``).
        self._created_rv: dict[tuple[str, str], int] = {}
        self._listed_before: tuple[str, str] | None = None
        self._epoch = 0  # bumped to end every open watch
        self._paused = False
        self._changed = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # ---- lifecycle ---------------------------------------------------------------

    def start(self) -> "FakeApiServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._changed:
            self._epoch += 1
            self._changed.notify_all()
        self._server.shutdown()
        self._server.server_close()

    def kubeconfig(self, path: Path) -> Path:
        """Write a kubeconfig for this server (no credentials) to ``path``; return it."""
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }))
        return path

    # ---- test controls -----------------------------------------------------------

    @contextlib.contextmanager
    def watches_paused(self) -> Iterator[None]:
        """Open watches deliver nothing while inside (events are logged, as usual)."""
        with self._changed:
            self._paused = True
        try:
            yield
        finally:
            with self._changed:
                self._paused = False
                self._changed.notify_all()

    def expire_watches(self) -> None:
        """Forget the event log (as etcd compaction does) and end every open watch.

        A client that watches again from a version it had before gets ``410 Gone``
        and must list again.
        """
        with self._changed:
            # Never past the newest version a list returns (see lists_before).
            self._log_start = self._list_rv()
            self.events = [e for e in self.events if e[0] > self._log_start]
            self._epoch += 1
            self._changed.notify_all()

    @contextlib.contextmanager
    def lists_before(self, namespace: str, name: str) -> Iterator[None]:
        """Answer lists as if taken just before ``namespace/name`` was created.

        The object (and every later one) is left out and the list's
        ``resourceVersion`` is the one before its creation, so a watch from it
        delivers its ``ADDED`` event — what a client sees when an object is
        created right after its list. A ``get`` finds it as usual.
        """
        with self._changed:
            self._listed_before = (namespace, name)
        try:
            yield
        finally:
            with self._changed:
                self._listed_before = None

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The stored object (a copy), or None."""
        with self._changed:
            obj = self.objects.get((namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    # ---- the API -----------------------------------------------------------------

    def _record(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Give ``obj`` the next resourceVersion and log the event (the lock is held)."""
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self.events.append((self._rv, kind, copy.deepcopy(obj)))
        self._changed.notify_all()
        return copy.deepcopy(obj)

    def _validate(self, obj: dict[str, Any]) -> None:
        errors = validation_errors(self.schema, obj)
        if errors:
            name = obj.get("metadata", {}).get("name", "")
            raise ApiError(422, "Invalid",
                           f'{self.kind}.{self.group} "{name}" is invalid: ' + "; ".join(errors))

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        name = meta.get("name", "")
        if meta.get("namespace", namespace) != namespace:
            raise ApiError(400, "BadRequest", "the namespace of the object does not match the request")
        if obj.get("apiVersion") != f"{self.group}/{self.version}" or obj.get("kind") != self.kind:
            raise ApiError(400, "BadRequest", f"expected {self.group}/{self.version} {self.kind}")
        obj.pop("status", None)  # the status subresource: not set on create
        self._validate(obj)
        with self._changed:
            if (namespace, name) in self.objects:
                raise ApiError(409, "AlreadyExists", f'{self.plural}.{self.group} "{name}" already exists')
            meta.update(namespace=namespace, uid=str(uuid.uuid4()), generation=1,
                        creationTimestamp=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
            self.objects[(namespace, name)] = obj
            created = self._record("ADDED", obj)
            self._created_rv[(namespace, name)] = self._rv
            return created

    def _existing(self, namespace: str, name: str) -> dict[str, Any]:
        obj = self.objects.get((namespace, name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{self.plural}.{self.group} "{name}" not found')
        return obj

    def update(self, namespace: str, name: str, new: dict[str, Any], *, status: bool) -> dict[str, Any]:
        """Store ``new`` as the object (``status=False``: all but status; True: status only)."""
        with self._changed:
            old = self._existing(namespace, name)
            obj = copy.deepcopy(old)
            if status:
                obj["status"] = copy.deepcopy(new.get("status"))
                if obj["status"] is None:
                    obj.pop("status")
            else:
                for key, value in new.items():
                    if key not in ("status", "metadata"):
                        obj[key] = copy.deepcopy(value)
                for key in ("labels", "annotations"):
                    if key in new.get("metadata", {}):
                        obj["metadata"][key] = copy.deepcopy(new["metadata"][key])
                if obj.get("spec") != old.get("spec"):
                    obj["metadata"]["generation"] = old["metadata"]["generation"] + 1
            self._validate(obj)
            if obj == old:
                return copy.deepcopy(old)  # a no-op write does not change the resourceVersion
            self.objects[(namespace, name)] = obj
            return self._record("MODIFIED", obj)

    def delete(self, namespace: str, name: str) -> dict[str, Any]:
        with self._changed:
            obj = self._existing(namespace, name)
            del self.objects[(namespace, name)]
            self._record("DELETED", obj)
            return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                    "details": {"name": name, "group": self.group, "kind": self.plural,
                                "uid": obj["metadata"]["uid"]}}

    def _list_rv(self) -> int:
        """The resourceVersion a list returns now (the lock is held)."""
        if self._listed_before is not None:
            return self._created_rv[self._listed_before] - 1
        return self._rv

    def list(self, namespace: str | None) -> dict[str, Any]:
        with self._changed:
            rv = self._list_rv()
            items = [copy.deepcopy(o) for (ns, name), o in sorted(self.objects.items())
                     if (namespace is None or ns == namespace) and self._created_rv[(ns, name)] <= rv]
            return {"apiVersion": f"{self.group}/{self.version}", "kind": f"{self.kind}List",
                    "metadata": {"resourceVersion": str(rv)}, "items": items}

    def watch(self, namespace: str | None, since: int, timeout_s: float) -> Iterator[dict[str, Any]]:
        """Events after ``since`` (then new ones) until ``timeout_s``, ``expire_watches`` or ``stop``."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            epoch = self._epoch
            if since < self._log_start:
                yield {"type": "ERROR", "object": ApiError(
                    410, "Expired", f"too old resource version: {since} ({self._log_start})").status()}
                return
        while True:
            bookmark = None
            with self._changed:
                while True:
                    if self._epoch != epoch:
                        return
                    pending = [] if self._paused else [e for e in self.events if e[0] > since]
                    remaining = deadline - time.monotonic()
                    if pending or remaining <= 0:
                        break
                    self._changed.wait(remaining)
                if not pending:  # timed out: tell the client how far it is, as the API server may
                    bookmark = {"type": "BOOKMARK", "object": {
                        "kind": self.kind, "apiVersion": f"{self.group}/{self.version}",
                        "metadata": {"resourceVersion": str(since)}}}  # all up to it were sent
            if bookmark is not None:
                yield bookmark
                return
            for rv, kind, obj in pending:
                since = rv
                if namespace is None or obj["metadata"]["namespace"] == namespace:
                    yield {"type": kind, "object": copy.deepcopy(obj)}

    # ---- HTTP --------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self
        prefix = None  # filled per request: the group may only be known after __init__

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                pass

            def _route(self) -> tuple[str | None, str | None, bool, dict[str, list[str]]]:
                nonlocal prefix
                prefix = prefix or f"/apis/{api.group}/{api.version}"
                url = urlsplit(self.path)
                match = re.fullmatch(
                    rf"{re.escape(prefix)}(?:/namespaces/(?P<ns>[^/]+))?/{api.plural}(?:/(?P<name>[^/]+))?"
                    r"(?P<status>/status)?", url.path)
                if match is None:
                    raise ApiError(404, "NotFound",
                                   f"the server could not find the requested resource ({url.path})")
                return match["ns"], match["name"], bool(match["status"]), parse_qs(url.query)

            def _body(self) -> dict[str, Any]:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    return json.loads(self.rfile.read(length) or b"{}")
                except json.JSONDecodeError as exc:
                    raise ApiError(400, "BadRequest", f"invalid JSON: {exc}") from None

            def _note(self, verb: str, resource: str, ns: str | None = None, name: str | None = None) -> None:
                where = f"{ns}/{name}" if name else ""
                api.requests.append(Request(verb, resource, where, self.headers.get("User-Agent", "")))

            def _send(self, code: int, obj: dict[str, Any]) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _serve(self, verb: str) -> None:
                try:
                    ns, name, status, query = self._route()
                    resource = api.plural + ("/status" if status else "")
                    if verb == "GET" and name is None:
                        if query.get("watch", ["false"])[0] == "true":
                            self._note("watch", resource)
                            self._stream(ns, query)
                            return
                        listing = api.list(ns)
                        self._note("list", resource)  # once the list is taken (lists_before)
                        self._send(200, listing)
                        return
                    if ns is None or (name is None and verb != "POST"):
                        raise ApiError(405, "MethodNotAllowed", f"{verb} {self.path}")
                    if verb == "POST":
                        self._note("create", resource)
                        self._send(201, api.create(ns, self._body()))
                    elif verb == "GET":
                        self._note("get", resource, ns, name)
                        with api._changed:
                            self._send(200, copy.deepcopy(api._existing(ns, name)))
                    elif verb == "PUT":
                        self._note("update", resource, ns, name)
                        self._send(200, api.update(ns, name, self._body(), status=status))
                    elif verb == "PATCH":
                        self._note("patch", resource, ns, name)
                        if "merge-patch" not in (self.headers.get("Content-Type") or ""):
                            raise ApiError(415, "UnsupportedMediaType", "only merge patches are served")
                        with api._changed:
                            current = copy.deepcopy(api._existing(ns, name))
                        patched = merge_patch(current, self._body())
                        self._send(200, api.update(ns, name, patched, status=status))
                    elif verb == "DELETE":
                        self._note("delete", resource, ns, name)
                        self._send(200, api.delete(ns, name))
                    else:
                        raise ApiError(405, "MethodNotAllowed", verb)
                except ApiError as exc:
                    self._send(exc.code, exc.status())

            def _stream(self, ns: str | None, query: dict[str, list[str]]) -> None:
                since = int(query.get("resourceVersion", ["0"])[0] or 0)
                timeout_s = float(query.get("timeoutSeconds", [DEFAULT_WATCH_TIMEOUT_S])[0])
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for event in api.watch(ns, since, timeout_s):
                        data = json.dumps(event).encode() + b"\n"
                        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away (Watch.stop, process exit)
                self.close_connection = True

            def do_GET(self) -> None:  # noqa: N802 - http.server's names
                self._serve("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._serve("POST")

            def do_PUT(self) -> None:  # noqa: N802
                self._serve("PUT")

            def do_PATCH(self) -> None:  # noqa: N802
                self._serve("PATCH")

            def do_DELETE(self) -> None:  # noqa: N802
                self._serve("DELETE")

        return Handler
