"""kmock's Kubernetes API emulator as the cluster of the kubernetes tests: a client for it, and the emulator
serving PyTorchJobs and pods as a cluster with the training operator would."""

import asyncio

import kmock
import pytest
from kubernetes import client


def api_client(server: kmock.RawHandler) -> client.ApiClient:
    configuration = client.Configuration()
    configuration.host = str(server.url).rstrip("/")
    return client.ApiClient(configuration)


@pytest.fixture
def cluster(kmock):
    kmock.resources["kubeflow.org/v1/pytorchjobs"] = {"kind": "PyTorchJob", "namespaced": True}
    kmock.resources["v1/pods"] = {"kind": "Pod", "namespaced": True}
    return kmock


async def call(fn, *args, **kwargs):
    """The client is synchronous: run it in a worker thread while the emulator serves on the event loop."""
    return await asyncio.wait_for(asyncio.to_thread(fn, *args, **kwargs), timeout=60)
