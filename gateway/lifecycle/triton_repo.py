"""Async helpers over Triton's model repository API (explicit model-control mode).

Which versions of a model Triton serves is set by the ``version_policy`` of the config it loads
with: ``specific { versions: [1, 2] }`` keeps both loaded. :meth:`TritonRepository.load` (re)loads
a model, optionally with a config override (sent as JSON; it replaces ``config.pbtxt`` for this
load only, so write the same policy to disk with ``materialize.serve_versions`` to survive a
restart). A reload that fails leaves the versions loaded before it serving.

gRPC failures become typed errors that keep Triton's message: a refused load says why (a corrupt
ONNX file, an exception raised in a python model's ``initialize``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from gateway.lifecycle.errors import (
    LifecycleError,
    ModelLoadFailed,
    RepositoryUnavailable,
    VersionNotReady,
)
from gateway.repository.configs import set_version_policy
from python_backend.contract import LOGGED_BY, LOGGED_BY_PROBE, decode, ensemble_inputs

READY = "READY"
UNLOADING = "UNLOADING"


@dataclass(frozen=True)
class VersionState:
    """One entry of Triton's repository index."""

    model: str
    #: ``None`` for a model that was never loaded (the index lists it without a version)
    version: int | None
    state: str
    reason: str


def config_json(config: mc.ModelConfig) -> str:
    """``config`` as the JSON Triton's load request takes as an override."""
    return json_format.MessageToJson(config, preserving_proto_field_name=True)


class TritonRepository:
    """Load, unload and inspect model versions; open and close it on the serving loop."""

    def __init__(
        self, url: str, *, load_timeout_s: float = 120.0, call_timeout_s: float = 5.0
    ) -> None:
        self.url = url
        self.load_timeout_s = load_timeout_s
        self.call_timeout_s = call_timeout_s
        self._client = grpcaio.InferenceServerClient(url)

    async def close(self) -> None:
        await self._client.close()

    async def index(self) -> list[VersionState]:
        """Every model version Triton knows, loaded or not, with the reason of its state."""
        try:
            index = await self._client.get_model_repository_index(
                client_timeout=self.call_timeout_s
            )
        except InferenceServerException as exc:
            raise self._error(exc, "repository index") from None
        return [
            VersionState(m.name, int(m.version) if m.version else None, m.state, m.reason)
            for m in index.models
        ]

    async def versions(self, model: str) -> dict[int, VersionState]:
        """Version -> state of ``model`` in the repository index."""
        return {
            s.version: s for s in await self.index() if s.model == model and s.version is not None
        }

    async def ready_versions(self, model: str) -> list[int]:
        return sorted(v for v, s in (await self.versions(model)).items() if s.state == READY)

    async def server_ready(self) -> bool:
        """Triton's server readiness (strict: every model version it tried to load is READY)."""
        try:
            return bool(await self._client.is_server_ready(client_timeout=self.call_timeout_s))
        except InferenceServerException as exc:
            raise self._error(exc, "server") from None

    async def config(self, model: str) -> mc.ModelConfig:
        """The config Triton serves ``model`` with."""
        try:
            response = await self._client.get_model_config(
                model, client_timeout=self.call_timeout_s
            )
        except InferenceServerException as exc:
            raise self._error(exc, model) from None
        return response.config

    async def load(self, model: str, config: mc.ModelConfig | None = None) -> None:
        """(Re)load ``model`` from its ``config.pbtxt``, or with ``config`` as an override.

        Returns once Triton has loaded every version of the policy; raises
        :class:`ModelLoadFailed` with Triton's reason otherwise.
        """
        try:
            await self._client.load_model(
                model,
                config=config_json(config) if config is not None else None,
                client_timeout=self.load_timeout_s,
            )
        except InferenceServerException as exc:
            raise self._error(exc, model, loading=True) from None

    async def load_versions(self, model: str, versions: Iterable[int]) -> mc.ModelConfig:
        """Reload ``model`` serving exactly ``versions``: its served config with a new policy.

        Triton skips a listed version that has no directory without an error; this raises
        :class:`ModelLoadFailed` if any listed version is not READY after the load.
        """
        wanted = sorted(set(versions))
        config = set_version_policy(await self.config(model), wanted)
        await self.load(model, config)
        states = await self.versions(model)
        missing = [v for v in wanted if v not in states or states[v].state != READY]
        if missing:
            raise ModelLoadFailed(
                f"triton {self.url} ({model}): versions {missing} not READY after the load "
                "(no such version directory?)"
            )
        return config

    async def unload_version(self, model: str, version: int) -> list[int]:
        """Stop serving ``version`` by reloading with a policy that drops it; the rest remain.

        Returns the versions still served. Refuses to drop the last one (use :meth:`unload`).
        """
        ready = await self.ready_versions(model)
        keep = [v for v in ready if v != version]
        if not keep:
            raise LifecycleError(f"{model}: version {version} is the only one served")
        await self.load_versions(model, keep)
        return keep

    async def unload(self, model: str) -> None:
        """Unload every version of ``model`` (ensembles using it stop answering)."""
        try:
            await self._client.unload_model(model, client_timeout=self.load_timeout_s)
        except InferenceServerException as exc:
            raise self._error(exc, model, loading=True) from None

    async def wait_ready(
        self, model: str, version: int, timeout_s: float, poll_s: float = 0.1
    ) -> None:
        """Wait until ``version`` of ``model`` is READY; raise with its state and reason if not."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = (await self.versions(model)).get(version)
            if state is not None and state.state == READY:
                return
            if time.monotonic() >= deadline:
                seen = f"{state.state}: {state.reason or 'no reason given'}" if state else "absent"
                raise VersionNotReady(
                    f"{model} version {version} not READY within {timeout_s:g}s ({seen})"
                )
            await asyncio.sleep(poll_s)

    async def wait_unloaded(
        self, model: str, version: int, timeout_s: float, poll_s: float = 0.1
    ) -> None:
        """Wait until ``version`` has finished unloading (its in-flight requests are done)."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = (await self.versions(model)).get(version)
            if state is None or state.state not in (READY, UNLOADING):
                return
            if time.monotonic() >= deadline:
                raise VersionNotReady(
                    f"{model} version {version} still {state.state} after {timeout_s:g}s"
                )
            await asyncio.sleep(poll_s)

    async def infer(
        self, model: str, version: int, input_name: str, output_name: str, x: np.ndarray
    ) -> np.ndarray:
        """Run ``x`` (FP32 [rows, n]) through exactly ``version`` of ``model``."""
        tensor = grpcclient.InferInput(input_name, list(x.shape), "FP32")
        tensor.set_data_from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        try:
            result = await self._client.infer(
                model,
                [tensor],
                model_version=str(version),
                outputs=[grpcclient.InferRequestedOutput(output_name)],
                client_timeout=self.call_timeout_s,
            )
        except InferenceServerException as exc:
            raise self._error(exc, f"{model} version {version}") from None
        return np.asarray(result.as_numpy(output_name))

    async def infer_pipeline(
        self, ensemble: str, user_ids: list[str], merchant_ids: list[str], context: np.ndarray
    ) -> tuple[np.ndarray, list[str]]:
        """Score rows through a pipeline ensemble; returns (prediction, label) per row."""
        inputs = ensemble_inputs(grpcclient, user_ids, merchant_ids, context)
        try:
            result = await self._client.infer(
                ensemble,
                inputs,
                outputs=[
                    grpcclient.InferRequestedOutput("prediction"),
                    grpcclient.InferRequestedOutput("label"),
                ],
                parameters={LOGGED_BY: LOGGED_BY_PROBE},  # a smoke test, not a prediction
                client_timeout=self.call_timeout_s,
            )
        except InferenceServerException as exc:
            raise self._error(exc, ensemble) from None
        labels = [decode(v) for v in np.asarray(result.as_numpy("label")).reshape(-1)]
        return np.asarray(result.as_numpy("prediction")).reshape(-1), labels

    async def probe(self, model: str, version: int | None, timeout_s: float) -> None:
        """One row of neutral inputs (zeros, ``probe`` strings, booleans true) through
        ``model`` (``version``, or the one Triton picks); raises with Triton's message."""
        try:
            meta = await self._client.get_model_metadata(model, client_timeout=timeout_s)
            inputs = [_probe_input(t.name, t.datatype, list(t.shape)) for t in meta.inputs]
            await self._client.infer(
                model,
                inputs,
                model_version=str(version) if version is not None else "",
                parameters={LOGGED_BY: LOGGED_BY_PROBE},
                client_timeout=timeout_s,
            )
        except InferenceServerException as exc:
            raise self._error(exc, model) from None

    def _error(
        self, exc: InferenceServerException, what: str, loading: bool = False
    ) -> LifecycleError:
        status = str(exc.status() or "")
        text = exc.message() or str(exc)
        where = f"triton {self.url} ({what})"
        if status.endswith("UNAVAILABLE"):
            return RepositoryUnavailable(f"{where} unavailable: {text}")
        if status.endswith("DEADLINE_EXCEEDED"):
            return VersionNotReady(f"{where}: no answer within the deadline: {text}")
        if loading:
            return ModelLoadFailed(f"{where}: {text}")
        return LifecycleError(f"{where} failed ({status or 'no status'}): {text}")


_PROBE_DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64}


def _probe_input(name: str, datatype: str, shape: list[int]) -> grpcclient.InferInput:
    dims = [1 if d < 0 else d for d in shape] or [1]
    tensor = grpcclient.InferInput(name, dims, datatype)
    if datatype == "BYTES":
        tensor.set_data_from_numpy(np.full(dims, b"probe", dtype=object))
    elif datatype == "BOOL":
        tensor.set_data_from_numpy(np.ones(dims, dtype=bool))
    else:
        tensor.set_data_from_numpy(np.zeros(dims, dtype=_PROBE_DTYPES.get(datatype, np.float32)))
    return tensor
