"""What every Keel gRPC server and client shares: loopback by default, a bearer token on every
call, optional TLS, bounded message sizes, and INVALID_ARGUMENT for a request whose bytes do not
parse (`add_servicer`).

The token comes from an environment variable or a file, never from the command line (where
`ps` would show it) nor from a Ray runtime_env (which Ray keeps in its job and actor tables, for
the dashboard to show). Health checks (`grpc.health.v1.Health`) answer without a token so that
Kubernetes probes work; every other method needs it.

Mutual TLS: with `tls_client_ca` servers refuse a client without a certificate signed by it, and
clients present `tls_client_cert`.
"""

from __future__ import annotations

import atexit
import hmac
import os
import shutil
import tempfile
from concurrent import futures
from pathlib import Path

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from keel.config import GrpcConfig

HEALTH_PREFIX = "/grpc.health.v1.Health/"


class SecurityConfigError(ValueError):
    """The gRPC security settings cannot be used; names the setting."""


def handed_token_env(cfg: GrpcConfig) -> str:
    """The variable that holds the path of a token file handed over by a driver: `<token_env>_FILE`."""
    return f"{cfg.token_env}_FILE"


def load_token(cfg: GrpcConfig) -> str | None:
    """The bearer token: env var `cfg.token_env`, else the file a driver handed over in
    `$<token_env>_FILE` (when it is on this node), else the file `cfg.token_file`. None when auth is off."""
    if not cfg.auth:
        return None
    token = os.environ.get(cfg.token_env, "").strip()
    handed = os.environ.get(handed_token_env(cfg), "")
    if not token and handed:
        try:
            token = Path(handed).read_text().strip()
        except OSError:
            pass  # written on the driver's node only: elsewhere token_file or the node's env must hold it
    if not token and cfg.token_file:
        try:
            token = Path(cfg.token_file).read_text().strip()
        except OSError as err:
            raise SecurityConfigError(
                f"transport.grpc.token_file: cannot read {cfg.token_file} ({err.strerror})"
            ) from None
    if not token:
        where = f"${cfg.token_env}" + (f" or {cfg.token_file}" if cfg.token_file else "")
        hint = (
            f"; the driver's token file {handed} is not on this node: set ${cfg.token_env} in the environment of "
            "`ray start` on every node, or mount transport.grpc.token_file there"
            if handed
            else ""
        )
        raise SecurityConfigError(
            f"transport.grpc.auth is on but no token was found in {where} (set auth: false to run without one){hint}"
        )
    return token


def hand_over_token(cfg: GrpcConfig) -> dict[str, str]:
    """For a driver whose token is in its environment: the env vars that let the processes it starts
    find the token, without the token itself (they go in a Ray runtime_env, which anyone who can
    read the dashboard sees).

    The token is written to a new file that only this user can read (0600, in a 0700 directory,
    deleted when this process exits), and only its path is handed over, as `$<token_env>_FILE`.
    It reaches processes on this node even when Ray was started without the token; processes on
    other nodes read their own environment or `cfg.token_file`. {} when auth is off or the token
    is not in this process's environment.
    """
    token = os.environ.get(cfg.token_env, "").strip() if cfg.auth else ""
    if not token:
        return {}
    folder = tempfile.mkdtemp(prefix="keel-token-")  # mode 0700
    atexit.register(shutil.rmtree, folder, True)
    path = os.path.join(folder, "token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return {handed_token_env(cfg): path}


def message_options(cfg: GrpcConfig) -> list[tuple[str, int]]:
    limit = int(cfg.max_message_mb * 2**20)
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


DENIED = "missing or wrong bearer token"


class _TokenCheck:
    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def allows(self, handler_call_details) -> bool:
        if handler_call_details.method.startswith(HEALTH_PREFIX):
            return True
        sent = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        return hmac.compare_digest(sent.encode(), self._expected)


class BearerAuth(grpc.ServerInterceptor):
    """Rejects any call (but health checks) whose `authorization` metadata is not `Bearer <token>`."""

    def __init__(self, token: str):
        self._check = _TokenCheck(token)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or self._check.allows(handler_call_details):
            return handler
        # Answer with the same streaming shape as the real method, so the client sees a clean status.
        return _deny_like(handler)


class AioBearerAuth(grpc.aio.ServerInterceptor):
    """`BearerAuth` for grpc.aio servers."""

    def __init__(self, token: str):
        self._check = _TokenCheck(token)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or self._check.allows(handler_call_details):
            return handler
        return _deny_like_aio(handler)


def _deny_like(handler):
    def abort(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)

    def abort_stream(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)
        yield  # pragma: no cover - makes this a generator

    return _handler_like(handler, abort, abort_stream)


def _deny_like_aio(handler):
    async def abort(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)

    async def abort_stream(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)
        yield  # pragma: no cover - makes this an async generator

    return _handler_like(handler, abort, abort_stream)


def _handler_like(handler, unary, streaming):
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming)
    return grpc.unary_unary_rpc_method_handler(unary)


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise SecurityConfigError(f"transport.grpc.{setting}: cannot read {path} ({err.strerror})") from None


def _bind(server, cfg: GrpcConfig, port: int) -> int:
    address = f"{cfg.host}:{port}"
    if cfg.tls_cert:
        client_ca = _read(cfg.tls_client_ca, "tls_client_ca") if cfg.tls_client_ca else None
        creds = grpc.ssl_server_credentials(
            [(_read(cfg.tls_key, "tls_key"), _read(cfg.tls_cert, "tls_cert"))],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,  # mutual TLS: no valid client certificate, no handshake
        )
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise SecurityConfigError(f"transport.grpc.host: cannot bind {address}")
    return bound


def make_server(
    cfg: GrpcConfig, port: int = 0, max_workers: int = 8, max_concurrency: int | None = None
) -> tuple[grpc.Server, int]:
    """A grpc server bound to cfg.host:port (0 = any free port) with auth, TLS and size limits;
    calls beyond `max_concurrency` in flight are refused with RESOURCE_EXHAUSTED.

    Returns (server, bound port); add servicers, then start it.
    """
    token = load_token(cfg)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=[BearerAuth(token)] if token else [],
        options=message_options(cfg),
        maximum_concurrent_rpcs=max_concurrency,
    )
    return server, _bind(server, cfg, port)


def make_aio_server(cfg: GrpcConfig, port: int = 0, max_concurrency: int | None = None) -> tuple[grpc.aio.Server, int]:
    """`make_server` for grpc.aio: call it inside the event loop that will run the server."""
    token = load_token(cfg)
    server = grpc.aio.server(
        interceptors=[AioBearerAuth(token)] if token else [],
        options=message_options(cfg),
        maximum_concurrent_rpcs=max_concurrency,
    )
    return server, _bind(server, cfg, port)


class Unparsed:
    """Stands in for a request whose bytes did not parse, until the handler refuses it."""

    def __init__(self, type_name: str):
        self.details = f"request: the bytes are not a valid {type_name}"


def _lenient(message_cls):
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except DecodeError:
            return Unparsed(message_cls.DESCRIPTOR.full_name)

    return parse


def _refuse_unparsed_sync(behavior, request_streaming: bool):
    def check(request, context):
        if isinstance(request, Unparsed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
        return request

    if request_streaming:
        return lambda requests, context: behavior((check(r, context) for r in requests), context)
    return lambda request, context: behavior(check(request, context), context)


def _refuse_unparsed_aio(behavior):
    async def unary(request, context):
        if isinstance(request, Unparsed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
        return await behavior(request, context)

    return unary


_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_servicer(server, service, servicer) -> None:
    """Register `servicer` for `service` (a protobuf ServiceDescriptor) as the generated
    `add_*Servicer_to_server` does, except that a request whose bytes do not parse (a malformed
    message, invalid UTF-8 in a string) is answered with INVALID_ARGUMENT naming its type; grpc's
    own answer is UNKNOWN or INTERNAL with a Python class name. On grpc.aio servers only unary
    methods are supported (all the aio services here are)."""
    aio = isinstance(server, grpc.aio.Server)
    handlers = {}
    for method in service.methods:
        kind = (method.client_streaming, method.server_streaming)
        behavior = getattr(servicer, method.name)
        if aio and kind != (False, False):
            raise NotImplementedError(f"add_servicer: {method.full_name} streams; only unary aio methods are supported")
        guarded = _refuse_unparsed_aio(behavior) if aio else _refuse_unparsed_sync(behavior, method.client_streaming)
        handlers[method.name] = _HANDLERS[kind](
            guarded,
            request_deserializer=_lenient(message_factory.GetMessageClass(method.input_type)),
            response_serializer=message_factory.GetMessageClass(method.output_type).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def advertised_address(cfg: GrpcConfig, port: int) -> str:
    """host:port other processes dial to reach a server bound here: cfg.advertise_host, or cfg.host,
    or (when bound to every interface) this node's IP as Ray sees it."""
    host = cfg.advertise_host or cfg.host
    if host in ("0.0.0.0", "::", "[::]"):
        import ray

        host = ray.util.get_node_ip_address()
    return f"{host}:{port}"


NO_CLIENT_CERT = (
    "transport.grpc.tls_client_cert: tls_client_ca is set, so this job's servers ask for a client certificate, "
    "and its own clients have none to present"
)


def make_channel(cfg: GrpcConfig, address: str, server_name: str | None = None) -> grpc.Channel:
    """A client channel to `address` with the same size limits, over TLS when the config has TLS:
    verified against cfg.tls_ca, or the system's roots when only a certificate is set (the job's
    own servers use tls_cert, so its own clients must speak TLS too). With tls_client_cert the
    client presents it (mutual TLS).

    `server_name` overrides the name checked against the server certificate.
    """
    options = message_options(cfg)
    if not (cfg.tls_ca or cfg.tls_cert or cfg.tls_client_cert):
        return grpc.insecure_channel(address, options=options)
    if cfg.tls_client_ca and not cfg.tls_client_cert:
        raise SecurityConfigError(NO_CLIENT_CERT)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    roots = _read(cfg.tls_ca, "tls_ca") if cfg.tls_ca else None
    key, chain = (None, None)
    if cfg.tls_client_cert:
        key, chain = _read(cfg.tls_client_key, "tls_client_key"), _read(cfg.tls_client_cert, "tls_client_cert")
    creds = grpc.ssl_channel_credentials(roots, private_key=key, certificate_chain=chain)
    return grpc.secure_channel(address, creds, options=options)


TLS_FILES = ("tls_cert", "tls_key", "tls_ca", "tls_client_ca", "tls_client_cert", "tls_client_key")


def job_tls_problems(cfg: GrpcConfig) -> list[str]:
    """For a job that both serves and calls with `cfg`: TLS files that are missing, and servers
    that ask for client certificates its own clients do not have (one line per problem)."""
    problems = []
    for setting in TLS_FILES:
        path = getattr(cfg, setting)
        if path and not Path(path).is_file():
            problems.append(f"transport.grpc.{setting}: {path} does not exist")
    if cfg.tls_client_ca and not cfg.tls_client_cert:
        problems.append(NO_CLIENT_CERT)
    return problems


def call_metadata(cfg: GrpcConfig) -> tuple[tuple[str, str], ...]:
    """Metadata to send on every call: the bearer token when auth is on."""
    token = load_token(cfg)
    return (("authorization", f"Bearer {token}"),) if token else ()


class GrpcClient:
    """What every Keel client holds: its settings, the peer's address, a channel with the size limits
    and TLS of `cfg`, a stub, and the bearer-token metadata sent on every call."""

    def __init__(self, cfg: GrpcConfig, address: str, stub_cls, base_delay_s: float = 0.1):
        self.cfg = cfg
        self.address = address
        self.base_delay_s = base_delay_s  # first retry backoff (transport.retry)
        self._channel = make_channel(cfg, address)
        self._stub = stub_cls(self._channel)
        self._metadata = call_metadata(cfg)

    def close(self) -> None:
        self._channel.close()


def serve(cfg: GrpcConfig, port: int, add, max_workers: int = 8) -> tuple[grpc.Server, int, str]:
    """A started sync server with auth/TLS/limits, grpc health, `max_workers` handler threads and
    `add(server)` applied; returns (server, bound port, the address other processes dial)."""
    from grpc_health.v1 import health, health_pb2_grpc

    server, bound = make_server(cfg, port, max_workers)
    add(server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.start()
    return server, bound, advertised_address(cfg, bound)
