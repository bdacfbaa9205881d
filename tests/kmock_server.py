#!/usr/bin/env python3
"""The Kubernetes API emulator for the tests: kmock's in-memory KubernetesEmulator,
stamping a resourceVersion on every object it stores (kube-rs watchers need one)."""
import argparse
import asyncio
import itertools

import aiohttp
import kmock

RESOURCE_VERSIONS = itertools.count(1)

# Resources the daemon watches: the emulator knows a resource once it holds an object
# of it, so each gets one placeholder in a namespace the tests never use.
PLACEHOLDERS = [
    ("/api/v1/namespaces/kmock-placeholder/pods", {"apiVersion": "v1", "kind": "Pod"}),
    ("/api/v1/namespaces/kmock-placeholder/services", {"apiVersion": "v1", "kind": "Service"}),
    ("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node"}),
    ("/apis/apps/v1/namespaces/kmock-placeholder/replicasets", {"apiVersion": "apps/v1", "kind": "ReplicaSet"}),
    ("/apis/batch/v1/namespaces/kmock-placeholder/jobs", {"apiVersion": "batch/v1", "kind": "Job"}),
    ("/apis/discovery.k8s.io/v1/namespaces/kmock-placeholder/endpointslices",
     {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4", "endpoints": []}),
]


class Emulator(kmock.KubernetesEmulator):
    async def _handle(self, request):
        if (request.resource is not None and isinstance(request.data, dict)
                and request.action in (kmock.action.CREATE, kmock.action.UPDATE)):
            request.data.setdefault("metadata", {})["resourceVersion"] = str(next(RESOURCE_VERSIONS))
        return await super()._handle(request)


async def main(port):
    async with Emulator() as emulator, kmock.Server(emulator, port=port) as server:
        async with aiohttp.ClientSession() as http:
            for path, body in PLACEHOLDERS:
                name = "placeholder-" + body["kind"].lower()
                doc = {**body, "metadata": {"name": name}}
                async with http.post(f"http://127.0.0.1:{server.port}{path}", json=doc) as resp:
                    assert resp.status < 300, (path, resp.status, await resp.text())
        print("listening", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))
