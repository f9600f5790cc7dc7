"""The Kubernetes API side of the ``InterposerPolicy`` reconciler (``--kubernetes``).

Uses the ``kubernetes`` client, which is synchronous: :class:`ResourceFeed`
lists and watches in a thread of its own and hands each event to the event
loop; status writes run in the default executor. The calls, and so the RBAC
rules in ``deploy/base/rbac/policy-role.yaml`` (a test pins them together):

* ``list_cluster_custom_object`` — list ``interposerpolicies`` in every
  namespace, and watch them from the list's ``resourceVersion``;
* ``get_namespaced_custom_object`` — read one resource (is it really gone?);
* ``patch_namespaced_custom_object_status`` — merge-patch a resource's status.

List + watch: the watch starts at the list's ``resourceVersion`` and continues
from the last event's (bookmarks included). A ``410 Gone`` (the version left the
API server's watch cache) or any other API error ends the watch; the feed then
lists again — a ``SYNC`` event, after which the reconciler sweeps keys whose
resource went away unseen. It also lists again every ``resync_s``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from interposer.proto import resource

from ._config import PolicyServiceConfig
from ._reconciler import Reconciler, run
from ._service import PolicyService

log = logging.getLogger(__name__)

#: Wait after a failed list or watch before the next, seconds.
DEFAULT_API_RETRY_S = 2.0
#: Wait before handling a failed event again (the bucket away), seconds.
DEFAULT_EVENT_RETRY_S = 1.0
#: Tries per event before it is left to the next resync.
DEFAULT_EVENT_ATTEMPTS = 30
#: HTTP status of an expired ``resourceVersion``.
GONE = 410
#: HTTP status of a resource that does not exist (deleted before its status was written).
NOT_FOUND = 404


def load_api(kubeconfig: str = "") -> Any:
    """A ``kubernetes.client.CustomObjectsApi`` for this pod's service account or a kubeconfig.

    Args:
        kubeconfig: path of a kubeconfig file; ``""`` = the in-cluster config
            (the pod's service account token and the API server's service).

    Raises:
        kubernetes.config.ConfigException: not in a pod, or an unusable kubeconfig.
    """
    from kubernetes import client, config  # only with --kubernetes: the embedded stack never loads it

    configuration = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    else:
        config.load_incluster_config(client_configuration=configuration)
    return client.CustomObjectsApi(client.ApiClient(configuration))


class ResourceFeed:
    """Lists and watches ``InterposerPolicy`` objects in a thread; queues the events.

    Events (on ``events``, put from the thread with ``call_soon_threadsafe``):
    ``("SYNC", [object, …])`` after every list, ``("ADDED" | "MODIFIED" |
    "DELETED", object)`` from the watch; objects are the API's JSON as dicts.

    Args:
        api: a ``CustomObjectsApi``.
        events: the reconciler's queue.
        loop: the event loop that owns ``events``.
        resync_s: list again this often, seconds.
    """

    def __init__(self, api: Any, events: asyncio.Queue[tuple[str, Any]], loop: asyncio.AbstractEventLoop,
                 resync_s: float) -> None:
        self.api = api
        self.events = events
        self.loop = loop
        self.resync_s = resync_s
        self._stopped = threading.Event()
        self._watch: Any = None
        self._thread = threading.Thread(target=self._run, name="interposerpolicy-feed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop listing and watching (the thread ends with its current request)."""
        self._stopped.set()
        if self._watch is not None:
            self._watch.stop()

    def _put(self, event: tuple[str, Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the service is shutting down
            self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                listing = self.api.list_cluster_custom_object(resource.GROUP, resource.VERSION,
                                                              resource.PLURAL)
            except Exception as exc:  # noqa: BLE001 - API away, RBAC missing, CRD not installed
                log.warning("cannot list %s (%s); retrying", resource.PLURAL, exc)
                self._stopped.wait(DEFAULT_API_RETRY_S)
                continue
            items = listing.get("items") or []
            log.info("listed %d InterposerPolicy resources", len(items))
            self._put(("SYNC", items))
            self._follow(listing["metadata"]["resourceVersion"])

    def _follow(self, resource_version: str) -> None:
        """Watch from ``resource_version`` until the resync is due, a 410 or an API error."""
        from kubernetes.client.exceptions import ApiException
        from kubernetes.watch import Watch

        deadline = time.monotonic() + self.resync_s
        while not self._stopped.is_set():
            remaining_s = int(deadline - time.monotonic())
            if remaining_s < 1:
                return
            self._watch = Watch()
            try:
                # timeout_seconds also makes the client raise on a 410 instead of retrying by itself.
                for event in self._watch.stream(self.api.list_cluster_custom_object, resource.GROUP,
                                                resource.VERSION, resource.PLURAL,
                                                resource_version=resource_version, allow_watch_bookmarks=True,
                                                timeout_seconds=remaining_s):
                    obj = event["raw_object"]
                    resource_version = obj["metadata"]["resourceVersion"]
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self._put((event["type"], obj))
            except ApiException as exc:
                if exc.status == GONE:
                    log.info("watch from resourceVersion %s expired (410 Gone); listing again",
                             resource_version)
                else:
                    log.warning("watch failed (%s %s); listing again", exc.status, exc.reason)
                    self._stopped.wait(DEFAULT_API_RETRY_S)
                return
            except Exception as exc:  # noqa: BLE001 - connection lost: resume from the last version
                if self._stopped.is_set():
                    return
                log.warning("watch interrupted (%s); resuming from resourceVersion %s", exc, resource_version)
                self._stopped.wait(DEFAULT_API_RETRY_S)


def status_writer(api: Any):  # noqa: ANN201 - a StatusWriter
    """A coroutine function ``(namespace, name, status)`` that merge-patches a resource's status."""
    from kubernetes.client.exceptions import ApiException

    async def write(namespace: str, name: str, status: dict[str, Any]) -> None:
        try:
            await asyncio.to_thread(api.patch_namespaced_custom_object_status, resource.GROUP,
                                    resource.VERSION, namespace, resource.PLURAL, name, {"status": status})
        except ApiException as exc:
            if exc.status == NOT_FOUND:
                return  # deleted meanwhile: its DELETED event follows
            raise

    return write


def resource_reader(api: Any):  # noqa: ANN201 - a ResourceReader
    """A coroutine function ``(namespace, name)`` → the resource, or None if it does not exist."""
    from kubernetes.client.exceptions import ApiException

    async def read(namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await asyncio.to_thread(api.get_namespaced_custom_object, resource.GROUP, resource.VERSION,
                                           namespace, resource.PLURAL, name)
        except ApiException as exc:
            if exc.status == NOT_FOUND:
                return None
            raise

    return read


async def reconcile(service: PolicyService, config: PolicyServiceConfig) -> None:
    """Reconcile ``InterposerPolicy`` resources into the bucket until cancelled."""
    api = await asyncio.to_thread(load_api, config.kubeconfig)
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    feed = ResourceFeed(api, events, asyncio.get_running_loop(), config.kubernetes_resync_s)
    feed.start()
    reconciler = Reconciler(service, status_writer(api), resource_reader(api))
    acknowledgements = asyncio.create_task(reconciler.run_acknowledgements(config.kubernetes_status_interval_s))
    try:
        await run(reconciler, events, DEFAULT_EVENT_RETRY_S, DEFAULT_EVENT_ATTEMPTS)
    finally:
        acknowledgements.cancel()
        feed.stop()
