"""The hand-written baseline: what a team would write instead of the gateway, for comparison.

``POST /predict/fraud_xgb`` with the gateway's request body does the gateway's work in one
process and no Triton: one pipelined Redis round trip for the user and merchant hashes, the
same ``feature_spec.json`` defaults and ranges, the same ``xgboost.json``, the decision
threshold of ``metadata.json``. No auth, no rate limit, no canary split, no prediction log, no
fallback: the floor the gateway is measured against (docs/benchmarks.md).

    .venv/bin/python perf_analyzer/baseline_service.py --version-dir model_repository/fraud_xgb/1 \
        --redis-url redis://127.0.0.1:6380/0 --port 8070 --workers 2
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import orjson
import redis.asyncio as aioredis
import uvicorn
import xgboost as xgb
from fastapi import FastAPI, Request
from starlette.responses import Response

from python_backend.contract import CONTEXT_FEATURES
from python_backend.feature_spec import FeatureSpec, ModelMetadata


def create_app(version_dir: Path, redis_url: str, key_prefix: str = "features") -> FastAPI:
    spec = FeatureSpec.load(version_dir / "feature_spec.json")
    meta = ModelMetadata.load(version_dir / "metadata.json")
    booster = xgb.Booster()
    booster.load_model(str(version_dir / "xgboost.json"))
    booster.set_param({"nthread": 1})
    groups = {g: spec.group_features(g) for g in ("user", "merchant", "context")}
    fields = {g: [f.name for f in defs] for g, defs in groups.items()}
    default = np.array([f.default for f in spec.features], dtype=np.float32)
    low = np.array([f.min for f in spec.features], dtype=np.float32)
    high = np.array([f.max for f in spec.features], dtype=np.float32)
    index = {name: i for i, name in enumerate(spec.names)}
    context_index = [index[name] for name in CONTEXT_FEATURES]
    user_index = [index[n] for n in fields["user"]]
    merchant_index = [index[n] for n in fields["merchant"]]
    store = aioredis.Redis.from_url(redis_url)
    app = FastAPI()

    @app.post("/predict/fraud_xgb")
    async def predict(request: Request) -> Response:
        body = orjson.loads(await request.body())
        ids = body["entity_ids"]
        async with store.pipeline(transaction=False) as pipe:
            pipe.hmget(f"{key_prefix}:user:{ids['user_id']}", fields["user"])
            pipe.hmget(f"{key_prefix}:merchant:{ids['merchant_id']}", fields["merchant"])
            user, merchant = await pipe.execute()
        row = np.full(len(default), np.nan, dtype=np.float32)
        row[user_index] = [float(v) if v is not None else np.nan for v in user]
        row[merchant_index] = [float(v) if v is not None else np.nan for v in merchant]
        context = body.get("context", {})
        row[context_index] = [float(context.get(n, np.nan)) for n in CONTEXT_FEATURES]
        valid = np.isfinite(row) & (row >= low) & (row <= high)
        row = np.where(valid, row, default)
        probability = float(booster.inplace_predict(row.reshape(1, -1))[0])
        fraud = probability >= meta.threshold
        answer = {
            "prediction": probability,
            "label": meta.class_names[1] if fraud else meta.class_names[0],
            "confidence": probability if fraud else 1.0 - probability,
            "model_name": "fraud_xgb",
            "model_version": str(meta.version),
            "imputed_count": int(len(row) - valid.sum()),
        }
        return Response(orjson.dumps(answer), media_type="application/json")

    return app


def _app_from_env() -> FastAPI:
    """The app of one uvicorn worker (``--workers`` re-imports this module)."""
    return create_app(Path(os.environ["BASELINE_VERSION_DIR"]), os.environ["BASELINE_REDIS_URL"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--version-dir", type=Path, required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8070)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    os.environ["BASELINE_VERSION_DIR"] = str(args.version_dir.resolve())
    os.environ["BASELINE_REDIS_URL"] = args.redis_url
    uvicorn.run(
        "baseline_service:_app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        app_dir=str(Path(__file__).parent),
    )


if __name__ == "__main__":
    main()
