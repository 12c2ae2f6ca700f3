"""Feature assembly cost of one dynamic batch of 64 single-row requests.

Skipped by the default ``--benchmark-skip``; run with
``.venv/bin/pytest tests/unit/test_assembler_bench.py --benchmark-only -q``.

Recorded 2026-11-23 on a 2-vCPU AMD EPYC VM, Python 3.11, numpy 1.26 (medians):
all 128 entities cached 0.32 ms; all cache misses (parse 128 hashes of 20 fields from an
in-memory fake Redis) 1.7 ms. A real Redis round trip comes on top of the miss case.
"""

import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from python_backend.breaker import CircuitBreaker
from python_backend.feature_spec import FeatureDef, FeatureSpec
from python_backend.features.assembler import AssemblyInput, FeatureAssembler, online_fields
from python_backend.features.cache import EntityCache
from python_backend.features.store import RedisFeatureStore

ROWS = 64
SPEC = FeatureSpec(
    features=[
        FeatureDef(name=f"u{i}", group="user", default=0, min=-1e6, max=1e6) for i in range(20)
    ]
    + [FeatureDef(name=f"m{i}", group="merchant", default=0, min=-1e6, max=1e6) for i in range(20)]
    + [FeatureDef(name=f"c{i}", group="context", default=0, min=-1e6, max=1e6) for i in range(10)]
)


class InMemoryPipeline:
    def __init__(self, hashes: dict[str, dict[str, bytes]]) -> None:
        self.hashes = hashes
        self.commands: list[tuple[str, list[str]]] = []

    def __enter__(self) -> "InMemoryPipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.commands = []

    def hmget(self, key: str, fields: list[str]) -> None:
        self.commands.append((key, fields))

    def execute(self, raise_on_error: bool = True) -> list[list[bytes | None]]:
        return [[self.hashes[key].get(f) for f in fields] for key, fields in self.commands]


class InMemoryRedis:
    def __init__(self) -> None:
        self.hashes = {
            f"features:{group}:{prefix}{n:06d}": {
                f"{prefix}{i}": f"{n + i * 0.25}".encode() for i in range(20)
            }
            for group, prefix in (("user", "u"), ("merchant", "m"))
            for n in range(ROWS)
        }

    def pipeline(self, transaction: bool = True) -> InMemoryPipeline:
        return InMemoryPipeline(self.hashes)


def batch() -> list[AssemblyInput]:
    """64 single-row requests, as Triton's dynamic batcher delivers them."""
    rng = np.random.default_rng(0)
    return [
        AssemblyInput(
            user_ids=[f"u{n:06d}".encode()],
            merchant_ids=[f"m{n:06d}".encode()],
            context=rng.random((1, 10), dtype=np.float32),
        )
        for n in range(ROWS)
    ]


def assembler(cache: EntityCache) -> FeatureAssembler:
    return FeatureAssembler(
        SPEC, RedisFeatureStore(InMemoryRedis(), online_fields(SPEC)), cache, CircuitBreaker()
    )


@pytest.mark.benchmark(group="assembler")
def test_bench_assemble_64_rows_from_cache(benchmark: BenchmarkFixture) -> None:
    asm = assembler(EntityCache())
    inputs = batch()
    asm.assemble(inputs)  # warm the cache
    results = benchmark(asm.assemble, inputs)
    assert len(results) == ROWS
    assert asm.stats().store_round_trips == 1


@pytest.mark.benchmark(group="assembler")
def test_bench_assemble_64_rows_all_misses(benchmark: BenchmarkFixture) -> None:
    # a TTL far below the benchmark's loop time: every round misses and parses every hash
    inputs = batch()
    asm = assembler(EntityCache(ttl_s=1e-9))
    results = benchmark(asm.assemble, inputs)
    assert len(results) == ROWS
    assert asm.stats().cache_hits == 0
