"""Replay through Triton: a scorer version loaded in the server, called over gRPC."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from gateway.store.replay import Probabilities, ReplayError, Runner
from python_backend.feature_spec import METADATA_FILE, ModelMetadata

#: rows per call: the scorers' max_batch_size is at least this
CHUNK_ROWS = 64


def triton_runner(client: grpcclient.InferenceServerClient) -> Runner:
    """A runner that scores with (model, version) as loaded in Triton."""

    def run(model: str, version: str, directory: Path) -> Probabilities:
        meta = ModelMetadata.load(directory / METADATA_FILE)
        if not client.is_model_ready(model, version):
            raise ReplayError(
                f"{model} version {version} is not loaded in Triton; replay "
                "offline (the default) instead"
            )

        def probabilities(x: np.ndarray) -> np.ndarray:
            out = []
            for start in range(0, len(x), CHUNK_ROWS):
                chunk = np.ascontiguousarray(x[start : start + CHUNK_ROWS], dtype=np.float32)
                tensor = grpcclient.InferInput(meta.input_name, list(chunk.shape), "FP32")
                tensor.set_data_from_numpy(chunk)
                result = client.infer(
                    model,
                    [tensor],
                    model_version=version,
                    outputs=[grpcclient.InferRequestedOutput(meta.output_name)],
                )
                out.append(result.as_numpy(meta.output_name))
            return np.concatenate(out).astype(np.float32)

        return probabilities

    return run
