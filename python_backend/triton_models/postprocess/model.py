"""Triton python-backend shell of the postprocess step (threshold, label, fallback).

Inputs ``probabilities`` (FP32 [rows, 2]), ``feature_store_ok`` (BOOL [rows, 1]),
``features`` (FP32 [rows, n_features]) and the request as sent (``user_id``, ``merchant_id``,
``context``, for the log records of direct clients: :mod:`python_backend.direct_log`); outputs
``prediction``, ``label``, ``confidence``,
``degraded`` and ``degraded_reason`` ([rows, 1] each). Rows scored without online features are
re-scored by a BLS call to the ``fallback_model`` (one call per batch), awaited for at most the
tightest remaining budget among the batch's requests (their Triton ``timeout``) and never
longer than ``fallback_timeout_ms``; past that the class prior answers. The logic lives in
:mod:`python_backend.postprocess`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend.direct_log import (
    DirectLog,
    DirectRequest,
    logged_elsewhere,
    open_direct_log,
    parameters_of,
)
from python_backend.metrics import CounterBuffer
from python_backend.postprocess import (
    FallbackScores,
    Postprocessor,
    PostprocessOutput,
    PostprocessStats,
    fallback_budget_us,
)
from python_backend.triton_config import (
    get_param,
    model_config,
    param_float,
    param_int,
    param_list,
)

logger = logging.getLogger(__name__)


class FallbackError(RuntimeError):
    """The fallback model answered with an error or without the expected output."""


class BlsFallback:
    """Scores rows with another Triton model through a BLS request, waited for at most the
    batch's budget. The call runs on a helper thread, so ``execute`` stays synchronous: an
    ``async def execute`` costs every batch a hop through the stub's event loop thread
    (docs/benchmarks.md), while degraded batches, the only callers, are rare."""

    def __init__(self, model_name: str, input_name: str, output_name: str, timeout_ms: int) -> None:
        self.model_name = model_name
        self._input = input_name
        self._output = output_name
        self.cap_us = max(timeout_ms, 0) * 1000
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fallback")

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    def score(self, x: np.ndarray, budget_us: int) -> np.ndarray:
        """Probabilities for ``x``, or an exception once ``budget_us`` has passed."""
        request = pb_utils.InferenceRequest(
            model_name=self.model_name,
            requested_output_names=[self._output],
            inputs=[pb_utils.Tensor(self._input, np.ascontiguousarray(x, dtype=np.float32))],
            timeout=budget_us,
        )
        pending = self._thread.submit(request.exec)
        # past the budget the call is abandoned (Triton still times it out by ``timeout``)
        response = pending.result(budget_us / 1e6 if budget_us else None)
        if response.has_error():
            raise FallbackError(f"{self.model_name}: {response.error().message()}")
        output = pb_utils.get_output_tensor_by_name(response, self._output)
        if output is None:
            raise FallbackError(f"{self.model_name} returned no {self._output}")
        return output.as_numpy()


class _Metrics:
    """Prediction counters, pushed to Triton at most once per ``interval_s``."""

    def __init__(
        self,
        labels: dict[str, str],
        class_names: list[str],
        reasons: list[str],
        interval_s: float,
    ) -> None:
        counter = pb_utils.MetricFamily.COUNTER
        # Triton requires a MetricFamily to outlive its Metric objects: keep every family.
        self._predictions = pb_utils.MetricFamily(
            name="rtinfer_predictions_total",
            description="Predictions served, by label",
            kind=counter,
        )
        self._degraded = pb_utils.MetricFamily(
            name="rtinfer_degraded_predictions_total",
            description="Predictions served without online features, by fallback used",
            kind=counter,
        )
        self._errors = pb_utils.MetricFamily(
            name="rtinfer_fallback_errors_total",
            description="Fallback calls that failed (class prior served instead)",
            kind=counter,
        )
        self._budget = pb_utils.MetricFamily(
            name="rtinfer_fallback_budget_us",
            description="Time the last fallback call was allowed (microseconds): the "
            "tightest remaining budget of its batch, at most fallback_timeout_ms",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self._by_label = {
            name: self._predictions.Metric(labels={**labels, "label": name}) for name in class_names
        }
        self._by_reason = {
            r: self._degraded.Metric(labels={**labels, "reason": r}) for r in reasons
        }
        self._fallback_errors = self._errors.Metric(labels=labels)
        self._last_budget = self._budget.Metric(labels=labels)
        self.budget_us: int | None = None
        self._buffer = CounterBuffer(interval_s)

    def record(
        self, out: PostprocessOutput, before: PostprocessStats, after: PostprocessStats
    ) -> None:
        """Account one batch locally (no server round trip); publish when due."""
        names, counts = np.unique(out.label, return_counts=True)
        for name, count in zip(names.tolist(), counts.tolist(), strict=True):
            self._buffer.add(("label", name), count)
        reasons, counts = np.unique(out.degraded_reason[out.degraded], return_counts=True)
        for reason, count in zip(reasons.tolist(), counts.tolist(), strict=True):
            self._buffer.add(("reason", reason), count)
        self._buffer.add(("fallback_errors", ""), after.fallback_errors - before.fallback_errors)
        if self._buffer.due():
            self.publish()

    def publish(self) -> None:
        metrics = {
            **{("label", k): m for k, m in self._by_label.items()},
            **{("reason", k): m for k, m in self._by_reason.items()},
            ("fallback_errors", ""): self._fallback_errors,
        }
        for key, delta in self._buffer.drain().items():
            metrics[key].increment(delta)
        if self.budget_us is not None:
            self._last_budget.set(self.budget_us)


def _invalid(message: str) -> Any:
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    )


def _optional_input(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _direct_request(request: Any, offset: int, rows: int) -> DirectRequest:
    return DirectRequest(
        request_id=request.request_id(),
        offset=offset,
        rows=rows,
        user_ids=_optional_input(request, "user_id"),
        merchant_ids=_optional_input(request, "merchant_id"),
        context=_optional_input(request, "context"),
    )


def _column(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values).reshape(-1, 1)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = model_config(args)
        threshold = get_param(config, "threshold")
        class_prior = get_param(config, "class_prior")
        if threshold is None or class_prior is None:
            raise pb_utils.TritonModelException(
                "model parameters threshold and class_prior are required"
            )
        class_names = param_list(config, "class_names", str, ["legit", "fraud"])
        fallback_model = get_param(config, "fallback_model")
        fallback = None
        if fallback_model is not None:
            fallback = BlsFallback(
                fallback_model,
                input_name=get_param(config, "fallback_input", "input__0") or "input__0",
                output_name=get_param(config, "fallback_output", "output__0") or "output__0",
                timeout_ms=param_int(config, "fallback_timeout_ms", 50),
            )
        self._fallback_indices = param_list(config, "fallback_feature_indices", int, [])
        if fallback is not None and not self._fallback_indices:
            raise pb_utils.TritonModelException(
                "model parameter fallback_feature_indices is required with a fallback_model"
            )
        self._fallback = fallback
        self._post = Postprocessor(
            threshold=param_float(config, "threshold", 0.5),
            class_names=class_names,
            class_prior=param_float(config, "class_prior", 0.0),
            fallback_name=fallback_model or "",
        )
        labels = {"model": args["model_name"], "version": args["model_version"]}
        reasons = ["feature_store_unavailable:class_prior"]
        if fallback_model is not None:
            reasons.append(f"feature_store_unavailable:{fallback_model}")
        self._metrics = _Metrics(
            labels, class_names, reasons, param_float(config, "metrics_interval_s", 1.0)
        )
        self._direct: DirectLog | None = open_direct_log(
            {k: get_param(config, k) or "" for k in config.get("parameters") or {}},
            args["model_instance_name"],
        )
        logger.info(
            "postprocess ready: threshold %s, classes %s, fallback %s",
            threshold,
            class_names,
            fallback_model or "class prior",
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        batch: list[tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]] = []
        for i, request in enumerate(requests):
            try:
                batch.append((i, self._read(request)))
            except ValueError as exc:
                responses[i] = _invalid(str(exc))
        if not batch:
            return responses
        probs, ok, feats = (np.concatenate([b[1][j] for b in batch]) for j in range(3))
        before = dataclasses.replace(self._post.stats)
        try:
            scores = self._fallback_scores(feats, ok, [requests[i] for i, _ in batch])
            out = self._post.process(probs, ok, feats, self._fallback_indices, scores)
        except Exception as exc:
            logger.exception("postprocess failed for a batch of %d requests", len(batch))
            error = pb_utils.TritonError(f"postprocess failed: {exc}")
            for i, _ in batch:
                responses[i] = pb_utils.InferenceResponse(error=error)
            return responses
        start = 0
        for i, inputs in batch:
            end = start + len(inputs[0])
            responses[i] = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("prediction", _column(out.prediction[start:end])),
                    pb_utils.Tensor("label", _column(out.label[start:end])),
                    pb_utils.Tensor("confidence", _column(out.confidence[start:end])),
                    pb_utils.Tensor("degraded", _column(out.degraded[start:end])),
                    pb_utils.Tensor("degraded_reason", _column(out.degraded_reason[start:end])),
                ]
            )
            start = end
        try:
            self._metrics.record(out, before, self._post.stats)
        except Exception:
            logger.exception("publishing postprocess metrics failed")
        if self._direct is not None:
            self._log_direct(requests, batch, feats, out)
        return responses

    def _log_direct(
        self,
        requests: list[Any],
        batch: list[tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]],
        feats: np.ndarray,
        out: PostprocessOutput,
    ) -> None:
        """Log the rows of the batch's direct-client requests (never fails the batch)."""
        assert self._direct is not None
        try:
            direct: list[DirectRequest] = []
            offset = 0
            for i, inputs in batch:
                request, rows = requests[i], len(inputs[0])
                if not logged_elsewhere(parameters_of(request.parameters())):
                    direct.append(_direct_request(request, offset, rows))
                offset += rows
            self._direct.log(direct, feats, out)
        except Exception:
            logger.exception("logging direct predictions failed")

    def _fallback_scores(
        self, feats: np.ndarray, ok: np.ndarray, requests: list[Any]
    ) -> FallbackScores | None:
        """Run the BLS fallback for the degraded rows within the batch's budget."""
        if self._fallback is None or ok.all():
            return None
        x = self._post.fallback_inputs(feats, ok, self._fallback_indices)
        budget_us = fallback_budget_us(self._fallback.cap_us, [r.timeout() for r in requests])
        self._metrics.budget_us = budget_us
        try:
            return self._fallback.score(x, budget_us)
        except Exception as exc:  # served the class prior instead; counted as a fallback error
            return exc

    def _read(self, request: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        arrays = []
        for name in ("probabilities", "feature_store_ok", "features"):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"missing input {name}")
            arrays.append(tensor.as_numpy())
        probabilities, ok, features = arrays
        return self._post.check_inputs(probabilities, ok.reshape(-1), features)

    def finalize(self) -> None:
        try:
            self._metrics.publish()
        except Exception:
            logger.exception("publishing postprocess metrics failed")
        if self._direct is not None:
            self._direct.close()
        if self._fallback is not None:
            self._fallback.close()
        logger.info("postprocess unloading")
