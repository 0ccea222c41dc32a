"""A single-node cluster made of kernel namespaces and a few asyncio tasks.

`Cluster` holds the objects (what `kubectl apply` and `helm install` send),
and does what the control plane and the node do with them:

- the Deployment controller: ReplicaSets by pod-template hash, rolling
  updates honouring maxSurge/maxUnavailable and readiness, Recreate;
- the kubelet (`kubelet.Pod`): one network namespace per pod, volumes,
  environment, probes, hooks, termination;
- the EndpointSlice controller: ready/serving/terminating per pod, ports
  resolved per pod (a named targetPort only matches pods that have it), fed to
  a fake API server (`tests.support.fake_kube`) over HTTPS with service
  account tokens and the rendered RBAC enforced, behind the `kubernetes`
  Service;
- CoreDNS (`network.ClusterDns`): Service A records (ClusterIP, or the ready
  pods of a headless Service), SRV records for named ports, pod records and
  the search path pods use;
- kube-proxy (`network.ServiceForwarder`): a TCP forwarder per ClusterIP port
  that picks a ready endpoint per connection.

There is one node and no scheduler: affinity and topology spread are not
evaluated. NetworkPolicies and PodDisruptionBudgets are stored, not enforced;
an HPA holds its Deployment within minReplicas..maxReplicas (no metrics);
objects of a custom resource (ServiceMonitor) need their
CustomResourceDefinition applied first, as in a real cluster.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hashlib
import json
import secrets
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme

from tests.cluster.harness.images import ImageRegistry
from tests.cluster.harness.kubelet import Pod
from tests.cluster.harness.netns import NODE_IP, ClusterNetwork
from tests.cluster.harness.network import (
    ClusterDns,
    Connector,
    Records,
    ServiceForwarder,
    SrvRecord,
    host_connector,
    pod_connector,
)
from tests.cluster.harness.objects import (
    Obj,
    ObjectError,
    annotations_of,
    labels_of,
    name_of,
    selector_matches,
    service_selects,
)
from tests.cluster.harness.probes import resolve_port
from tests.support.fake_kube import FakeKubeApiServer

DNS_IP = "127.0.250.10"
API_SERVICE_IP = "127.0.250.1"
SERVICE_IP_BASE = (127, 0, 200)
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
SLICE_LABEL = "kubernetes.io/service-name"


@dataclass
class Endpoint:
    pod: Pod
    ready: bool
    serving: bool
    terminating: bool
    ports: dict[str, int]  # service port name ("" when unnamed) -> target port


@dataclass
class Release:
    name: str
    namespace: str
    chart: str
    revision: int
    values: dict[str, Any]
    objects: list[Obj]
    hooks: list[Obj]
    status: str = "deployed"
    deployed_at: str = field(default_factory=lambda: time.strftime("%a %b %d %H:%M:%S %Y"))


class ClusterError(RuntimeError):
    pass


def template_hash(template: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()
    return digest[:10]


def _int_or_percent(value: Any, total: int, round_up: bool) -> int:
    if isinstance(value, str) and value.endswith("%"):
        exact = total * int(value[:-1]) / 100
        return int(-(-exact // 1)) if round_up else int(exact // 1)
    return int(value)


class Cluster:
    def __init__(self, work: Path, *, domain: str = "cluster.local") -> None:
        self.work = work
        self.domain = domain
        self.prefix = f"lb{secrets.token_hex(2)}"
        self.network = ClusterNetwork(self.prefix)
        self.registry = ImageRegistry()
        self.dns_ip = DNS_IP
        self.node_ip = NODE_IP
        self.namespaces: set[str] = {"default", "kube-system", "kube-public"}
        self.objects: dict[tuple[str, str, str], Obj] = {}
        self.pods: list[Pod] = []
        # Every pod ever created, gone ones too (their logs stay readable).
        self.all_pods: list[Pod] = []
        self.releases: dict[tuple[str, str], Release] = {}
        self._service_ips: dict[tuple[str, str], str] = {}
        self._next_service_ip = 1
        self._next_pod_ip = 0
        self._forwarders: dict[tuple[str, str], list[ServiceForwarder]] = {}
        self._tokens: dict[str, tuple[str, str]] = {}
        self._wake = asyncio.Event()
        self._controller: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._slice_names: dict[tuple[str, str], set[str]] = {}
        self.kubelet_sync_delay = 1.0
        self.stalls: list[tuple[str, float]] = []
        # API groups/versions objects may use: the built-in ones the chart
        # needs, plus those of installed CustomResourceDefinitions.
        self.api_versions: set[str] = {
            "v1",
            "apps/v1",
            "rbac.authorization.k8s.io/v1",
            "policy/v1",
            "autoscaling/v2",
            "networking.k8s.io/v1",
            "batch/v1",
            "discovery.k8s.io/v1",
            "apiextensions.k8s.io/v1",
        }
        self.ca = trustme.CA()
        self.api: FakeKubeApiServer | None = None
        self.dns: ClusterDns | None = None

    # -- lifecycle

    @property
    def node_netns(self) -> str:
        return self.network.node

    async def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.network.create()
        for address in (DNS_IP, API_SERVICE_IP):
            self.network.add_local_address(address)
        self.dns = ClusterDns(self.node_netns, DNS_IP, self.dns_records)
        await self.dns.start()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(
            API_SERVICE_IP,
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            f"kubernetes.default.svc.{self.domain}",
        ).configure_cert(context)
        self.api = FakeKubeApiServer(ssl_context=context, authorize=self._authorize)
        forwarder = ServiceForwarder(
            self.node_netns, API_SERVICE_IP, 443, lambda: [("apiserver", self._api_connector())]
        )
        await forwarder.start()
        self._forwarders[("default", "kubernetes")] = [forwarder]
        self._controller = asyncio.create_task(self._control_loop(), name="controllers")
        self.spawn(self._watch_stalls())

    def _api_connector(self) -> Connector:
        assert self.api is not None
        return host_connector("127.0.0.1", self.api.port)

    async def close(self) -> None:
        if self._controller is not None:
            self._controller.cancel()
            done, _ = await asyncio.wait({self._controller}, timeout=5)
            if not done:
                print("harness: the controller loop ignored its cancel", flush=True)
        pods = list(self.pods)
        try:
            await asyncio.wait_for(
                asyncio.gather(*(p.delete(grace=0) for p in pods), return_exceptions=True), 30
            )
        except TimeoutError:
            print(f"harness: pods still terminating at close:\n{self.describe()}", flush=True)
        for pod in pods:
            for container in pod.containers:
                if container.process is not None and container.process.returncode is None:
                    container.process.kill()
        for task in list(self._background):
            task.cancel()
        for forwarders in self._forwarders.values():
            for forwarder in forwarders:
                await forwarder.close()
        if self.dns is not None:
            await self.dns.close()
        if self.api is not None:
            self.api.close()
        self.network.close()

    async def _watch_stalls(self) -> None:
        """Records when the harness's own event loop was late by more than
        half a second: DNS, kube-proxy and probes all run on it."""
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.1)
            late = time.monotonic() - before - 0.1
            if late > 0.5:
                self.stalls.append((time.strftime("%H:%M:%S"), late))

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- objects

    @staticmethod
    def key(kind: str, namespace: str, name: str) -> tuple[str, str, str]:
        return (kind, "" if kind in CLUSTER_SCOPED else namespace, name)

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        return self.objects.get(self.key(kind, namespace, name))

    def objects_of(self, kind: str, namespace: str | None = None) -> list[Obj]:
        return [
            obj
            for (k, ns, _), obj in sorted(self.objects.items())
            if k == kind and (namespace is None or ns == namespace)
        ]

    def object_data(self, kind: str, namespace: str, name: str) -> dict[str, bytes] | None:
        """The data of a Secret or ConfigMap, as bytes per key."""
        if kind == "ConfigMap" and name == "kube-root-ca.crt":
            return {"ca.crt": self.ca.cert_pem.bytes()}
        obj = self.get(kind, namespace, name)
        if obj is None:
            return None
        data: dict[str, bytes] = {}
        if kind == "Secret":
            for k, v in (obj.get("data") or {}).items():
                data[k] = base64.b64decode(v)
            for k, v in (obj.get("stringData") or {}).items():
                data[k] = str(v).encode()
        else:
            for k, v in (obj.get("data") or {}).items():
                data[k] = str(v).encode()
            for k, v in (obj.get("binaryData") or {}).items():
                data[k] = base64.b64decode(v)
        return data

    async def apply(self, obj: Obj, namespace: str = "default") -> str:
        """Creates or replaces an object; returns kubectl's word for it."""
        obj = copy.deepcopy(obj)
        kind = obj.get("kind")
        name = name_of(obj)
        if not kind or not name:
            raise ObjectError("every object needs kind and metadata.name")
        metadata = obj.setdefault("metadata", {})
        if kind not in CLUSTER_SCOPED:
            metadata["namespace"] = metadata.get("namespace") or namespace
            if metadata["namespace"] not in self.namespaces:
                raise ObjectError(f'namespaces "{metadata["namespace"]}" not found')
        ns = metadata.get("namespace", "")
        key = self.key(kind, ns, name)
        existing = self.objects.get(key)
        if kind == "Namespace":
            self.namespaces.add(name)
        if kind == "CustomResourceDefinition":
            group = obj["spec"]["group"]
            for version in obj["spec"].get("versions") or []:
                self.api_versions.add(f"{group}/{version['name']}")
        if kind == "Service":
            obj = self._admit_service(obj, existing)
        if kind == "Secret" and obj.get("stringData"):
            data = obj.setdefault("data", {})
            for k, v in obj.pop("stringData").items():
                data[k] = base64.b64encode(str(v).encode()).decode()
        if kind == "Deployment" and existing is not None:
            generation = int(existing["metadata"].get("generation", 1))
            if existing.get("spec") != obj.get("spec"):
                generation += 1
            metadata["generation"] = generation
        elif kind == "Deployment":
            metadata["generation"] = 1
        self.objects[key] = obj
        if kind == "Service" and (
            existing is None or existing["spec"].get("ports") != obj["spec"].get("ports")
        ):
            # kube-proxy keeps established connections through a Service
            # re-applied with the same ports (helm upgrade applies them all).
            await self._sync_forwarders(obj)
        if kind in ("Secret", "ConfigMap") and existing is not None and existing != obj:
            self._schedule_volume_refresh(ns, kind, name)
        if kind == "Pod":
            if existing is not None:
                raise ObjectError(f'pods "{name}" already exists')
            self._create_pod(obj, owner=None)
        self.pods_changed()
        if existing is None:
            return "created"
        return "configured" if existing != obj else "unchanged"

    async def delete(self, kind: str, namespace: str, name: str, *, wait: bool = True) -> bool:
        key = self.key(kind, namespace, name)
        obj = self.objects.pop(key, None)
        if obj is None:
            if kind == "Pod":
                pod = self.find_pod(namespace, name)
                if pod is not None:
                    await pod.delete() if wait else self.spawn(pod.delete())
                    return True
            return False
        if kind == "Service":
            for forwarder in self._forwarders.pop((namespace, name), []):
                await forwarder.close()
        if kind == "Pod":
            pod = self.find_pod(namespace, name)
            if pod is not None:
                if wait:
                    await pod.delete()
                else:
                    self.spawn(pod.delete())
        if kind == "Deployment":
            doomed = [p for p in self.pods if p.owner == f"Deployment/{namespace}/{name}"]
            deletions = [self.spawn(p.delete()) for p in doomed]
            if wait and deletions:
                await asyncio.gather(*deletions)
        if kind == "Namespace":
            self.namespaces.discard(name)
        self.pods_changed()
        return True

    # -- services

    def _admit_service(self, obj: Obj, existing: Obj | None) -> Obj:
        spec = obj.setdefault("spec", {})
        ns, name = obj["metadata"]["namespace"], name_of(obj)
        if spec.get("type", "ClusterIP") not in ("ClusterIP", "NodePort", "LoadBalancer"):
            raise ObjectError(f"Service type {spec.get('type')} is not supported here")
        for port in spec.get("ports") or []:
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port["port"])
        if len(spec.get("ports") or []) > 1 and not all(p.get("name") for p in spec["ports"]):
            raise ObjectError(
                f"Service {name}: spec.ports: Required value: every port needs a name "
                "when there is more than one"
            )
        if spec.get("clusterIP") == "None":
            return obj
        ip = self._service_ips.get((ns, name))
        if ip is None:
            ip = ".".join(map(str, (*SERVICE_IP_BASE, self._next_service_ip)))
            self._next_service_ip += 1
            self._service_ips[(ns, name)] = ip
            self.network.add_local_address(ip)
        if existing is not None and spec.get("clusterIP") not in (None, ip):
            raise ObjectError(f"Service {name}: spec.clusterIP: field is immutable")
        spec["clusterIP"] = ip
        return obj

    async def _sync_forwarders(self, service: Obj) -> None:
        ns, name = service["metadata"]["namespace"], name_of(service)
        for forwarder in self._forwarders.pop((ns, name), []):
            await forwarder.close()
        spec = service["spec"]
        if spec.get("clusterIP") in (None, "None"):
            return
        forwarders = []
        for port in spec.get("ports") or []:
            if port.get("protocol", "TCP") != "TCP":
                continue
            forwarder = ServiceForwarder(
                self.node_netns,
                spec["clusterIP"],
                int(port["port"]),
                self._picker(ns, name, port.get("name", "")),
            )
            await forwarder.start()
            forwarders.append(forwarder)
        self._forwarders[(ns, name)] = forwarders

    def _picker(
        self, ns: str, service: str, port_name: str
    ) -> Callable[[], list[tuple[str, Connector]]]:
        def pick() -> list[tuple[str, Connector]]:
            obj = self.get("Service", ns, service)
            if obj is None:
                return []
            endpoints = [e for e in self.endpoints(obj) if port_name in e.ports]
            chosen = [e for e in endpoints if e.ready]
            if not chosen:
                chosen = [e for e in endpoints if e.serving and e.terminating]
            return [
                (e.pod.name, pod_connector(self.node_netns, e.pod.ip, e.ports[port_name]))
                for e in chosen
            ]

        return pick

    def master_service(self) -> Obj:
        return {
            "kind": "Service",
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "spec": {
                "clusterIP": API_SERVICE_IP,
                "ports": [{"name": "https", "port": 443, "protocol": "TCP"}],
            },
        }

    def services_in(self, namespace: str) -> list[Obj]:
        services = self.objects_of("Service", namespace)
        if namespace == "default":
            services = [s for s in services if name_of(s) != "kubernetes"]
        return services

    def endpoints(self, service: Obj) -> list[Endpoint]:
        """The EndpointSlice controller's view of one Service."""
        spec = service.get("spec") or {}
        ns = service["metadata"]["namespace"]
        publish = bool(spec.get("publishNotReadyAddresses"))
        result = []
        for pod in self.pods:
            if pod.namespace != ns or not pod.ip or not pod.netns:
                continue
            if pod.phase in ("Succeeded", "Failed", "Terminated"):
                continue
            if not service_selects(spec.get("selector"), pod.labels):
                continue
            ports: dict[str, int] = {}
            for port in spec.get("ports") or []:
                try:
                    ports[port.get("name", "")] = resolve_port(
                        port.get("targetPort", port["port"]), pod.spec.get("containers") or []
                    )
                except LookupError:
                    continue  # a named target port this pod does not have
            if not ports:
                continue
            serving = publish or pod.ready
            result.append(
                Endpoint(
                    pod=pod,
                    ready=serving and not pod.terminating,
                    serving=serving,
                    terminating=pod.terminating,
                    ports=ports,
                )
            )
        return result

    # -- DNS

    def dns_records(self, name: str) -> Records | None:
        suffix = f".svc.{self.domain}"
        if name.endswith(f".pod.{self.domain}"):
            head = name[: -len(f".pod.{self.domain}")].split(".")
            if len(head) == 2:
                ip = head[0].replace("-", ".")
                if any(p.ip == ip and p.namespace == head[1] for p in self.pods):
                    return Records(a=(ip,))
            return None
        if not name.endswith(suffix):
            return None
        labels = name[: -len(suffix)].split(".")
        if len(labels) == 2:
            return self._service_records(labels[1], labels[0])
        if len(labels) == 3 and not labels[0].startswith("_"):
            # <endpoint hostname>.<headless service>.<namespace>
            service = self.get("Service", labels[2], labels[1])
            if service is None:
                return None
            for endpoint in self.endpoints(service):
                if endpoint.pod.ip.replace(".", "-") == labels[0]:
                    return Records(a=(endpoint.pod.ip,))
            return None
        if len(labels) == 4 and labels[0].startswith("_") and labels[1].startswith("_"):
            return self._srv_records(labels[3], labels[2], labels[0][1:], labels[1][1:])
        return None

    def _service_records(self, namespace: str, name: str) -> Records | None:
        if (namespace, name) == ("default", "kubernetes"):
            return Records(a=(API_SERVICE_IP,))
        service = self.get("Service", namespace, name)
        if service is None:
            return None
        ip = service["spec"].get("clusterIP")
        if ip and ip != "None":
            return Records(a=(ip,))
        return Records(a=tuple(e.pod.ip for e in self.endpoints(service) if e.ready))

    def _srv_records(self, namespace: str, name: str, port_name: str, proto: str) -> Records | None:
        service = self.get("Service", namespace, name)
        if service is None:
            return None
        spec = service["spec"]
        ports = [
            p
            for p in spec.get("ports") or []
            if p.get("name") == port_name and p.get("protocol", "TCP").lower() == proto
        ]
        if not ports:
            return None
        host = f"{name}.{namespace}.svc.{self.domain}"
        if spec.get("clusterIP") not in (None, "None"):
            return Records(srv=tuple(SrvRecord(host, int(p["port"])) for p in ports))
        records = []
        for endpoint in self.endpoints(service):
            if endpoint.ready and port_name in endpoint.ports:
                target = f"{endpoint.pod.ip.replace('.', '-')}.{host}"
                records.append(SrvRecord(target, endpoint.ports[port_name]))
        return Records(srv=tuple(records))

    # -- service accounts and the API server

    def service_account_token(self, namespace: str, account: str) -> str:
        for token, who in self._tokens.items():
            if who == (namespace, account):
                return token
        token = f"sa.{namespace}.{account}.{secrets.token_hex(12)}"
        self._tokens[token] = (namespace, account)
        return token

    def _authorize(self, header: str | None, namespace: str, verb: str) -> int | None:
        """Runs in the fake API server's threads: token -> service account ->
        the rendered RoleBindings and (Cluster)Roles."""
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer":  # the API server takes any case
            return 401
        who = self._tokens.get(token.strip())
        if who is None:
            return 401
        if self.allowed(who, namespace, verb, "discovery.k8s.io", "endpointslices"):
            return None
        return 403

    def allowed(
        self, who: tuple[str, str], namespace: str, verb: str, group: str, resource: str
    ) -> bool:
        def subject_matches(binding: Obj) -> bool:
            return any(
                s.get("kind") == "ServiceAccount"
                and s.get("name") == who[1]
                and s.get("namespace", binding["metadata"].get("namespace")) == who[0]
                for s in binding.get("subjects") or []
            )

        def rules_allow(role: Obj | None) -> bool:
            for rule in (role or {}).get("rules") or []:
                if (
                    ({"*", group} & set(rule.get("apiGroups") or []))
                    and ({"*", resource} & set(rule.get("resources") or []))
                    and ({"*", verb} & set(rule.get("verbs") or []))
                ):
                    return True
            return False

        objects = dict(self.objects)
        for (kind, ns, _), binding in objects.items():
            if kind == "RoleBinding" and ns == namespace and subject_matches(binding):
                ref = binding["roleRef"]
                role_kind = ref.get("kind", "Role")
                role = objects.get(self.key(role_kind, namespace, ref["name"]))
                if rules_allow(role):
                    return True
            if (
                kind == "ClusterRoleBinding"
                and subject_matches(binding)
                and rules_allow(objects.get(("ClusterRole", "", binding["roleRef"]["name"])))
            ):
                return True
        return False

    def _sync_slices(self) -> None:
        """Writes every Service's EndpointSlices to the fake API server."""
        assert self.api is not None
        wanted: dict[tuple[str, str], dict[str, Obj]] = {}
        for service in self.objects_of("Service"):
            if not (service.get("spec") or {}).get("selector"):
                continue
            ns, name = service["metadata"]["namespace"], name_of(service)
            groups: dict[tuple[tuple[str, int], ...], list[Endpoint]] = {}
            for endpoint in self.endpoints(service):
                groups.setdefault(tuple(sorted(endpoint.ports.items())), []).append(endpoint)
            slices = {}
            for ports, endpoints in sorted(groups.items()):
                slice_name = f"{name}-{hashlib.sha1(repr(ports).encode()).hexdigest()[:5]}"
                slices[slice_name] = {
                    "kind": "EndpointSlice",
                    "apiVersion": "discovery.k8s.io/v1",
                    "metadata": {"name": slice_name, "labels": {SLICE_LABEL: name}},
                    "addressType": "IPv4",
                    "endpoints": [
                        {
                            "addresses": [e.pod.ip],
                            "conditions": {
                                "ready": e.ready,
                                "serving": e.serving,
                                "terminating": e.terminating,
                            },
                            "nodeName": "node-1",
                            "targetRef": {
                                "kind": "Pod",
                                "name": e.pod.name,
                                "namespace": ns,
                                "uid": e.pod.uid,
                            },
                        }
                        for e in sorted(endpoints, key=lambda e: e.pod.ip)
                    ],
                    "ports": [
                        {"name": port_name, "port": port, "protocol": "TCP"}
                        for port_name, port in ports
                    ],
                }
            wanted[(ns, name)] = slices
        current = {
            (o["metadata"]["namespace"], o["metadata"]["name"]): o
            for ns in self.namespaces
            for o in self.api.slices(ns)
        }
        for (ns, _), slices in wanted.items():
            for slice_name, obj in slices.items():
                existing = current.pop((ns, slice_name), None)
                if existing is None:
                    self.api.add_slice(ns, obj)
                elif _slice_body(existing) != _slice_body(obj):
                    self.api.modify_slice(ns, slice_name, obj)
        for ns, slice_name in current:
            self.api.delete_slice(ns, slice_name)

    # -- pods and controllers

    def allocate_pod_ip(self) -> str:
        self._next_pod_ip += 1
        n = self._next_pod_ip
        return f"127.0.{1 + (n - 1) // 250}.{1 + (n - 1) % 250}"

    def find_pod(self, namespace: str, name: str) -> Pod | None:
        for pod in self.pods:
            if pod.namespace == namespace and pod.name == name:
                found: Pod = pod
                return found
        return None

    def _create_pod(self, obj: Obj, owner: str | None) -> Pod:
        obj = copy.deepcopy(obj)
        if owner is not None:
            obj["metadata"]["_owner"] = owner
        pod = Pod(self, obj)
        self.pods.append(pod)
        self.all_pods.append(pod)
        pod.start()
        return pod

    def pods_changed(self) -> None:
        self._wake.set()

    def pod_gone(self, pod: Pod) -> None:
        if pod in self.pods:
            self.pods.remove(pod)
        self.objects.pop(self.key("Pod", pod.namespace, pod.name), None)
        self.pods_changed()

    async def _control_loop(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a
            # cancel that arrives as the event is set, and this loop would
            # then never end (close() waited on it forever: a CI run timed out).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await self._wake.wait()
            self._wake.clear()
            try:
                self._sync_slices()
                for deployment in self.objects_of("Deployment"):
                    self._reconcile_deployment(deployment)
            except Exception as err:
                print(f"harness controller error: {err!r}", flush=True)

    def deployment_pods(self, namespace: str, name: str, *, live: bool = True) -> list[Pod]:
        owner = f"Deployment/{namespace}/{name}"
        return [p for p in self.pods if p.owner == owner and not (live and p.terminating)]

    def _reconcile_deployment(self, deployment: Obj) -> None:
        ns, name = deployment["metadata"]["namespace"], name_of(deployment)
        spec = deployment.get("spec") or {}
        replicas = self._replicas(deployment)
        template = spec["template"]
        current_hash = template_hash(template)
        pods = self.deployment_pods(ns, name)
        new = [p for p in pods if p.labels.get("pod-template-hash") == current_hash]
        old = [p for p in pods if p.labels.get("pod-template-hash") != current_hash]
        strategy = spec.get("strategy") or {}
        if strategy.get("type") == "Recreate":
            for pod in old:
                self.spawn(pod.delete())
            if old or any(p.terminating for p in self.deployment_pods(ns, name, live=False)):
                return
            for _ in range(replicas - len(new)):
                self._new_pod(deployment, current_hash)
            return
        rolling = strategy.get("rollingUpdate") or {}
        surge = _int_or_percent(rolling.get("maxSurge", "25%"), replicas, True)
        unavailable = _int_or_percent(rolling.get("maxUnavailable", "25%"), replicas, False)
        if surge == 0 and unavailable == 0:
            unavailable = 1
        while len(new) < replicas and len(new) + len(old) < replicas + surge:
            new.append(self._new_pod(deployment, current_hash))
        available = sum(p.ready for p in new + old)
        minimum = replicas - unavailable
        for pod in sorted(old, key=lambda p: p.ready):
            if not pod.ready:
                self.spawn(pod.delete())
            elif available - 1 >= minimum:
                self.spawn(pod.delete())
                available -= 1
        if not old and len(new) > replicas:
            for pod in sorted(new, key=lambda p: p.ready)[: len(new) - replicas]:
                self.spawn(pod.delete())

    def _replicas(self, deployment: Obj) -> int:
        """spec.replicas (1 when unset), kept within an HPA's min and max:
        the autoscaler enforces its bounds at once (its metrics-driven
        scaling is not emulated: there is no metrics pipeline)."""
        replicas = int((deployment.get("spec") or {}).get("replicas", 1))
        ns, name = deployment["metadata"]["namespace"], name_of(deployment)
        for hpa in self.objects_of("HorizontalPodAutoscaler", ns):
            target = hpa["spec"].get("scaleTargetRef") or {}
            if target.get("kind") == "Deployment" and target.get("name") == name:
                low = int(hpa["spec"].get("minReplicas", 1))
                high = int(hpa["spec"]["maxReplicas"])
                replicas = min(max(replicas, low), high)
        return replicas

    def _new_pod(self, deployment: Obj, current_hash: str) -> Pod:
        ns, name = deployment["metadata"]["namespace"], name_of(deployment)
        template = copy.deepcopy(deployment["spec"]["template"])
        metadata = template.setdefault("metadata", {})
        metadata["labels"] = {**(metadata.get("labels") or {}), "pod-template-hash": current_hash}
        metadata["name"] = f"{name}-{current_hash}-{secrets.token_hex(3)[:5]}"
        metadata["namespace"] = ns
        return self._create_pod(
            {"metadata": metadata, "spec": template["spec"]}, owner=f"Deployment/{ns}/{name}"
        )

    def rollout_done(self, namespace: str, name: str) -> tuple[bool, str]:
        deployment = self.get("Deployment", namespace, name)
        if deployment is None:
            return False, f'deployments.apps "{name}" not found'
        replicas = self._replicas(deployment)
        current_hash = template_hash(deployment["spec"]["template"])
        pods = self.deployment_pods(namespace, name, live=False)
        updated = [p for p in pods if p.labels.get("pod-template-hash") == current_hash]
        ready = [p for p in updated if p.ready and not p.terminating]
        old = [p for p in pods if p.labels.get("pod-template-hash") != current_hash]
        if len(ready) < replicas:
            return False, (
                f'Waiting for deployment "{name}" rollout to finish: {len(ready)} of '
                f"{replicas} updated replicas are available..."
            )
        if [p for p in old if not p.terminating]:
            return False, (
                f'Waiting for deployment "{name}" rollout to finish: {len(old)} old replicas '
                "are pending termination..."
            )
        return True, f'deployment "{name}" successfully rolled out'

    def _schedule_volume_refresh(self, namespace: str, kind: str, name: str) -> None:
        """The kubelet notices changed Secrets and ConfigMaps on its own
        schedule: each pod after its own delay."""
        for index, pod in enumerate(list(self.pods)):
            if pod.namespace != namespace or not pod.netns:
                continue

            async def refresh(
                pod: Pod = pod, delay: float = self.kubelet_sync_delay * (1 + index % 3)
            ) -> None:
                await asyncio.sleep(delay)
                if not pod.terminating:
                    with contextlib.suppress(Exception):
                        pod.write_volumes()

            self.spawn(refresh())

    # -- waiting and describing

    async def wait_for(
        self, what: str, predicate: Callable[[], Any], limit: float = 60.0, interval: float = 0.1
    ) -> Any:
        deadline = time.monotonic() + limit
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {limit:.0f}s waiting for {what}\n{self.describe()}"
                )
            await asyncio.sleep(interval)

    async def wait_rollout(self, namespace: str, name: str, limit: float = 90.0) -> None:
        """Until `kubectl rollout status` would succeed; fails at once when a
        pod of the deployment crash-loops (restarted twice)."""

        def done() -> bool:
            for pod in self.deployment_pods(namespace, name):
                if pod.restarts >= 2:
                    raise AssertionError(
                        f"deployment {namespace}/{name}: pod {pod.name} is crash-looping\n"
                        f"{pod.describe()}"
                    )
            return self.rollout_done(namespace, name)[0]

        await self.wait_for(f"rollout of deployment {namespace}/{name}", done, limit)

    def describe(self) -> str:
        lines = [f"harness event loop stalls > 0.5 s: {self.stalls}"] if self.stalls else []
        for pod in self.pods:
            lines.append(pod.describe())
        for (ns, name), _ in self._forwarders.items():
            lines.append(f"Service {ns}/{name} ip={self._service_ips.get((ns, name), '')}")
        return "\n".join(lines)

    # -- exec

    def pick_pod(self, namespace: str, target: str) -> Pod:
        """`POD`, `deploy/NAME` or `deployment/NAME`, as kubectl resolves them."""
        kind, sep, name = target.partition("/")
        if sep and kind in ("deploy", "deployment", "deployments", "deployment.apps"):
            if self.get("Deployment", namespace, name) is None:
                raise ClusterError(f'deployments.apps "{name}" not found')
            pods = [p for p in self.deployment_pods(namespace, name) if p.phase == "Running"]
            if not pods:
                raise ClusterError(f"no running pod of deployment {name}")
            return sorted(pods, key=lambda p: p.created)[0]
        pod_name = name if sep else target
        if sep and kind not in ("pod", "pods", "po"):
            raise ClusterError(f"kubectl exec: unsupported target {target!r} in this harness")
        pod = self.find_pod(namespace, pod_name)
        if pod is None:
            raise ClusterError(f'pods "{pod_name}" not found')
        return pod


def _slice_body(obj: Obj) -> Any:
    return (obj.get("endpoints"), obj.get("ports"), (obj.get("metadata") or {}).get("labels"))


def objects_in(documents: Iterable[Any]) -> list[Obj]:
    """Rendered YAML documents (and List kinds) as objects."""
    result: list[Obj] = []
    for doc in documents:
        if not doc:
            continue
        if doc.get("kind", "").endswith("List") and "items" in doc:
            result.extend(objects_in(doc["items"]))
        else:
            result.append(doc)
    return result


__all__ = [
    "Cluster",
    "ClusterError",
    "Release",
    "annotations_of",
    "labels_of",
    "objects_in",
    "selector_matches",
]
