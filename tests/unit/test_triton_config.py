import json

import pytest

from python_backend.triton_config import (
    get_param,
    model_config,
    param_float,
    param_int,
    param_list,
    version_dir,
)


def config(**params: str) -> dict:
    return {"name": "m", "parameters": {k: {"string_value": v} for k, v in params.items()}}


def test_get_param() -> None:
    cfg = config(redis_url="redis://r:6379/0", empty="")
    assert get_param(cfg, "redis_url") == "redis://r:6379/0"
    assert get_param(cfg, "absent") is None
    assert get_param(cfg, "absent", "d") == "d"
    assert get_param(cfg, "empty", "d") == "d"
    assert get_param({"name": "m"}, "redis_url", "d") == "d"


def test_typed_params() -> None:
    cfg = config(timeout=" 10 ", ttl="2.5")
    assert param_int(cfg, "timeout", 1) == 10
    assert param_float(cfg, "ttl", 1.0) == 2.5
    assert param_int(cfg, "absent", 7) == 7
    assert param_float(cfg, "absent", 0.5) == 0.5


def test_typed_param_errors_name_the_parameter() -> None:
    cfg = config(timeout="ten", weights="0.5,x")
    with pytest.raises(ValueError, match="timeout='ten' is not an integer"):
        param_int(cfg, "timeout", 1)
    with pytest.raises(ValueError, match="timeout='ten' is not a number"):
        param_float(cfg, "timeout", 1.0)
    with pytest.raises(ValueError, match=r"weights='0\.5,x' is invalid"):
        param_list(cfg, "weights", float)


def test_param_list() -> None:
    cfg = config(weights="0.5, 0.5", idx="40,41,49", names="legit,fraud", none="")
    assert param_list(cfg, "weights", float) == [0.5, 0.5]
    assert param_list(cfg, "idx", int) == [40, 41, 49]
    assert param_list(cfg, "names", str) == ["legit", "fraud"]
    assert param_list(cfg, "none", int, [1]) == [1]
    assert param_list(cfg, "absent", int) == []


def test_args_helpers() -> None:
    args = {
        "model_config": json.dumps(config(a="1")),
        "model_repository": "/models/feature_assembler",
        "model_version": "3",
    }
    assert get_param(model_config(args), "a") == "1"
    assert version_dir(args) == "/models/feature_assembler/3"
