"""A private Apache Kafka broker (KRaft, one node acting as broker and controller).

The broker jars come from Maven Central through ``tools/kafka/pom.xml`` and are cached per
Kafka version; the broker runs from them on Java 17 with a small heap, its data and log in
one directory so a stop and start on the same directory keeps every topic and message.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import logging
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic

from gateway.settings import REPO_ROOT
from rtinfer.procs import (
    Launch,
    Process,
    ProcessError,
    ProgramSpec,
    log_tail,
    spawn_program,
    wait_until,
)

log = logging.getLogger(__name__)

POM = REPO_ROOT / "tools" / "kafka" / "pom.xml"
STAMP_FILE = ".pom-sha256"
MVN_TIMEOUT_S = 900.0
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # Debian's mvn colours even with -B

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    partitions: int
    retention_ms: int


DEFAULT_TOPICS: dict[str, TopicSpec] = {
    "predictions": TopicSpec(partitions=6, retention_ms=7 * DAY_MS),
    "predictions-shadow": TopicSpec(partitions=3, retention_ms=7 * DAY_MS),
    "inference-requests": TopicSpec(partitions=6, retention_ms=1 * DAY_MS),
    "inference-requests-dlq": TopicSpec(partitions=1, retention_ms=14 * DAY_MS),
    # ground truth from POST /feedback, kept long: labels arrive weeks after the prediction
    "prediction-labels": TopicSpec(partitions=3, retention_ms=30 * DAY_MS),
    # what the prediction sink could not store, with the reason in its headers
    "predictions-dlq": TopicSpec(partitions=1, retention_ms=14 * DAY_MS),
}


class TopicError(RuntimeError):
    """A topic could not be created or does not match what was asked for."""


def kafka_version(pom: Path = POM) -> str:
    """The Kafka version pinned in the pom (``<kafka.version>``)."""
    match = re.search(r"<kafka\.version>\s*([^<\s]+)\s*</kafka\.version>", pom.read_text())
    if match is None:
        raise ProcessError(f"no <kafka.version> property in {pom}")
    return match.group(1)


def default_libs_dir(pom: Path = POM) -> Path:
    return Path.home() / ".cache" / "rtinfer" / f"kafka-{kafka_version(pom)}" / "libs"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialize fetches of one cache between processes (e.g. parallel test sessions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def kafka_libs(cache_dir: Path | None = None, pom: Path = POM) -> Path:
    """The directory of broker jars, fetched with Maven unless the pom is unchanged since.

    ``cache_dir`` defaults to ``~/.cache/rtinfer/kafka-<version>/libs``. A stamp file in it
    holds the SHA-256 of the pom the jars were copied for.
    """
    libs = cache_dir if cache_dir is not None else default_libs_dir(pom)
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()
    stamp = libs / STAMP_FILE
    with _file_lock(libs.parent / f".{libs.name}.lock"):
        if stamp.exists() and stamp.read_text().strip() == digest:
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise ProcessError("mvn not found; install Debian's maven package (and Java 17)")
        libs.mkdir(parents=True, exist_ok=True)
        stamp.unlink(missing_ok=True)
        for old in libs.glob("*.jar"):  # jars of another pom must not stay on the classpath
            old.unlink()
        argv = [
            mvn, "-q", "-B", "-Dstyle.color=never", "-f", str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={libs}",
            "-DincludeScope=runtime",
        ]  # fmt: skip
        started = time.monotonic()
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=MVN_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise ProcessError(f"mvn did not finish in {MVN_TIMEOUT_S:.0f}s: {argv}") from exc
        if done.returncode != 0 or not any(libs.glob("kafka_*.jar")):
            output = ANSI_ESCAPE.sub("", done.stdout + done.stderr)
            tail = "\n".join(output.splitlines()[-40:])
            raise ProcessError(
                f"fetching the Kafka jars failed (mvn exit {done.returncode}); output tail:\n{tail}"
            )
        stamp.write_text(digest + "\n")
        log.info("fetched Kafka jars into %s in %.1fs", libs, time.monotonic() - started)
    return libs


def java_binary() -> str:
    path = shutil.which("java")
    if path is None:
        raise ProcessError("java not found; install Debian's openjdk-17-jre-headless package")
    return path


def new_cluster_id() -> str:
    """A random Kafka ``Uuid`` as the StorageTool expects it (URL-safe base64, no padding)."""
    while True:
        cid = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
        if not cid.startswith("-"):  # Kafka's own generator avoids these (they look like flags)
            return cid


def server_properties(data_dir: Path, port: int, controller_port: int, host: str) -> str:
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{host}:{controller_port}",
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "log.dirs": str(data_dir / "data"),
        "num.partitions": "1",
        "default.replication.factor": "1",
        "auto.create.topics.enable": "false",
        "offsets.topic.replication.factor": "1",
        # the broker creates these on first use; 50 partitions each is a cluster-sized default
        "offsets.topic.num.partitions": "6",
        "transaction.state.log.num.partitions": "6",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        # a laptop-sized footprint: small segments, small preallocated indexes
        "log.segment.bytes": str(16 * 1024 * 1024),
        "log.index.size.max.bytes": str(1024 * 1024),
        "num.network.threads": "2",
        "num.io.threads": "4",
        "num.recovery.threads.per.data.dir": "1",
    }
    return "".join(f"{k}={v}\n" for k, v in props.items())


LOG4J_PROPERTIES = """\
# everything to stdout, which the launcher appends to kafka.log in the data directory
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.kafka.log.LogCleaner=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.org.apache.kafka.common.utils.AppInfoParser=WARN
"""


def kafka_argv(
    libs: Path, log4j_config: Path, main_class: str, *args: str, max_heap: str = "512m"
) -> list[str]:
    """``java`` running ``main_class`` from the jars in ``libs`` with a small heap."""
    return [
        java_binary(),
        f"-Xmx{max_heap}",
        "-Xms256m",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:+ExplicitGCInvokesConcurrent",
        "-Djava.awt.headless=true",
        f"-Dlog4j.configuration=file:{log4j_config}",
        "-cp",
        f"{libs}/*",  # expanded by java, not by a shell
        main_class,
        *args,
    ]


def format_storage(
    data_dir: Path, libs: Path, config: Path, log4j_config: Path, log_path: Path
) -> None:
    """Write ``meta.properties`` with a new cluster id, unless the log dir has one already."""
    if (data_dir / "data" / "meta.properties").exists():
        return
    cluster_id = new_cluster_id()
    argv = kafka_argv(
        libs, log4j_config,
        "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config),
        max_heap="256m",
    )  # fmt: skip
    with log_path.open("ab") as out:
        done = subprocess.run(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=120
        )
    if done.returncode != 0:
        raise ProcessError(
            f"kafka storage format failed (exit {done.returncode}); log tail:\n{log_tail(log_path)}"
        )
    log.info("formatted Kafka storage in %s (cluster id %s)", data_dir / "data", cluster_id)


def first_errors(log_path: Path, offset: int = 0, limit: int = 3) -> str:
    """The first ERROR lines (each with the line after it) written after ``offset``."""
    with log_path.open("rb") as fh:
        fh.seek(offset)
        lines = fh.read().decode(errors="replace").splitlines()
    picked = ["\n".join(lines[i : i + 2]) for i, line in enumerate(lines) if "] ERROR " in line]
    return "\n".join(picked[:limit]) or "(none logged)"


def _librdkafka_logger() -> logging.Logger:
    """librdkafka logs every refused connection while the broker boots; keep it in logging."""
    return logging.getLogger(f"{__name__}.librdkafka")


def admin_client(bootstrap: str, **config: object) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap, "logger": _librdkafka_logger(), **config})


def broker_ready(admin: AdminClient, timeout_s: float = 2.0) -> bool:
    """The broker answers a metadata request and lists itself as alive (unfenced)."""
    md: ClusterMetadata = admin.list_topics(timeout=timeout_s)
    return len(md.brokers) > 0


def start_kafka(
    data_dir: Path,
    port: int,
    controller_port: int,
    host: str = "127.0.0.1",
    libs: Path | None = None,
    startup_timeout_s: float = 90.0,
    launch: Launch = spawn_program,
) -> Process:
    """Start a KRaft broker+controller on ``host:port`` with its files in ``data_dir``.

    Storage is formatted on the first start only, so a restart on the same directory keeps
    the topics and messages. Returns once the broker answers metadata requests.
    """
    started = time.monotonic()
    libs = libs if libs is not None else kafka_libs()
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "server.properties"
    config.write_text(server_properties(data_dir, port, controller_port, host))
    log4j_config = data_dir / "log4j.properties"
    log4j_config.write_text(LOG4J_PROPERTIES)
    log_path = data_dir / "kafka.log"
    format_storage(data_dir, libs, config, log4j_config, log_path)

    argv = kafka_argv(libs, log4j_config, "kafka.Kafka", str(config))
    log_offset = log_path.stat().st_size if log_path.exists() else 0
    proc = launch(ProgramSpec("kafka", argv, log_path, cwd=data_dir, stop_timeout_s=30.0))
    admin = admin_client(f"{host}:{port}")
    try:
        wait_until(
            lambda: broker_ready(admin),
            timeout_s=startup_timeout_s,
            proc=proc,
            what="Kafka metadata response",
            interval_s=0.25,
        )
    except ProcessError as exc:
        proc.stop()
        # the tail is mostly the shutdown that follows a fatal error; name the error itself
        errors = first_errors(log_path, log_offset)
        raise ProcessError(f"{exc}\nfirst errors of this start:\n{errors}") from exc
    except BaseException:
        proc.stop()
        raise
    log.info("kafka ready on %s:%d in %.1fs", host, port, time.monotonic() - started)
    return proc


def ensure_topics(
    bootstrap: str,
    topics: Mapping[str, TopicSpec] = DEFAULT_TOPICS,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create the missing ``topics`` (replication 1, ``retention.ms``); return their names.

    Existing topics are left as they are, but must have at least the requested partitions.
    """
    admin = admin_client(bootstrap)
    existing = admin.list_topics(timeout=timeout_s).topics
    for name, spec in topics.items():
        if name in existing and len(existing[name].partitions) < spec.partitions:
            raise TopicError(
                f"topic {name} has {len(existing[name].partitions)} partitions, "
                f"{spec.partitions} required"
            )
    missing = [
        NewTopic(
            name,
            num_partitions=spec.partitions,
            replication_factor=1,
            config={"retention.ms": str(spec.retention_ms)},
        )
        for name, spec in topics.items()
        if name not in existing
    ]
    if not missing:
        return []
    futures = admin.create_topics(missing, operation_timeout=timeout_s, request_timeout=timeout_s)
    created: list[str] = []
    for name, fut in futures.items():
        try:
            fut.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            err = exc.args[0]
            # created concurrently by someone else: fine as long as it is big enough
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise TopicError(f"creating topic {name} failed: {err}") from exc
    _wait_for_partitions(admin, topics, timeout_s)
    log.info("created Kafka topics %s", created)
    return created


def _wait_for_partitions(
    admin: AdminClient, topics: Mapping[str, TopicSpec], timeout_s: float
) -> None:
    """Metadata shows every topic with enough partitions (so producers can use them now)."""

    def visible() -> bool:
        md = admin.list_topics(timeout=min(timeout_s, 5.0)).topics
        return all(
            name in md and md[name].error is None and len(md[name].partitions) >= spec.partitions
            for name, spec in topics.items()
        )

    try:
        wait_until(visible, timeout_s=timeout_s, what="new topics in metadata", interval_s=0.1)
    except ProcessError as exc:
        raise TopicError(str(exc)) from exc
