"""Listen defaults: a gateway, not a proxy.

mitmproxy's defaults are a proxy's: listen on all interfaces at 8080, connect upstream eagerly.
This addon makes them a gateway's: ``bind_addr`` (loopback by default; beyond loopback only with
``gateway_api_key`` or ``clients``), reverse mode to the upstream, lazy upstream connections (eager would reset
clients when the upstream is down), ``store_streamed_bodies`` (flow files keep the translated
stream), and server replay that ignores the recorded upstream address. Also:

- ``keep_host_header``: in reverse mode mitmproxy rewrites ``Host`` to the reverse target before
  any hook runs; the gate checks the client's (DNS rebinding). Every request the gateway sends on
  sets its own (``Upstream.route``, the relay).
- ``http2`` off: clients speak HTTP/1.1 (over TLS too), the protocol every refusal at the head and
  every stream is verified on (addons/gate.py).
- ``stream_large_bodies`` off: mitmproxy would send a request body larger than it upstream as it
  arrives, its head at once, before any ``request`` hook: a turn's Responses body to the chat
  backend as it is, a passthrough without its upstream key or before a limited client's model is
  checked. The gateway reads every request body whole (each bounded: ``max_request_body_mb``,
  ``max_request_bodies_mb``) and streams every answer itself, so the option has nothing to give.
- TLS: ``tls_cert_file`` + ``tls_key_file`` become one PEM (key, certificate, chain; 0600) in
  mitmproxy's confdir, given to mitmproxy as its certificate for every name (``certs``): mitmproxy
  then accepts HTTPS from clients on the same port, and the gate refuses plain HTTP. A certificate
  Codex CLI refuses (a CA's, none of subjectAltName) is said at start-up. Listening
  beyond loopback without it is said loudly at start-up: the key and every prompt travel in clear.
- stdout line-buffered: mitmproxy's log (warnings, a failed turn's error) goes there, flushed only
  by its flow lines; with none (``flow_detail=0``, deploy/'s unit) and stdout no terminal
  (journald, a file), Python held 8 KiB of it before the first line showed.
"""

from __future__ import annotations

import asyncio
import io
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from mitmproxy import ctx, exceptions
from mitmproxy.proxy import mode_specs

from resp2chat_core import settings as S

from .base import Owner, log

TLS_PEM = "resp2chat-tls.pem"  # in mitmproxy's confdir: tls_key_file + tls_cert_file, 0600


class Listen(Owner):
    name = "resp2chat_listen"
    owner = "listen"
    also_reads = ("gateway_api_key", "clients", "upstream_base_url")
    watches = ("mode", "listen_host", "listen_port", "server_replay", "connection_strategy",
               "store_streamed_bodies", "server_replay_ignore_host", "server_replay_ignore_port",
               "keep_host_header", "http2", "stream_large_bodies", "certs", "confdir")

    def __init__(self, source, upstreams) -> None:
        super().__init__(source)
        self.upstreams = upstreams
        self._rebind = False
        self._warned: tuple | None = None
        self._warned_cert: tuple | None = None

    def load(self, loader) -> None:
        super().load(loader)
        if isinstance(sys.stdout, io.TextIOWrapper) and not sys.stdout.line_buffering:
            sys.stdout.reconfigure(line_buffering=True)  # each log line at once (see above)

    def apply(self, updated: set[str]) -> None:
        opts, changes = ctx.options, {}
        if "connection_strategy" not in opts:
            return  # not inside a proxy (unit tests with a bare options manager)
        if opts.connection_strategy != "lazy":
            changes["connection_strategy"] = "lazy"
        if not opts.store_streamed_bodies:
            changes["store_streamed_bodies"] = True
        if not opts.keep_host_header:
            changes["keep_host_header"] = True
        if opts.http2:
            changes["http2"] = False
        if opts.stream_large_bodies:
            changes["stream_large_bodies"] = None
        certs = self.certs(opts)
        if certs != list(opts.certs):
            changes["certs"] = certs
        if getattr(opts, "server_replay", None) and not (opts.server_replay_ignore_host and opts.server_replay_ignore_port):
            # A recording made against another upstream address must still match.
            changes["server_replay_ignore_host"] = changes["server_replay_ignore_port"] = True
        modes = list(opts.mode)
        if modes == ["regular"]:
            target = urlsplit(self.upstreams.default_url())
            modes = [f"reverse:{target.scheme}://{target.netloc}"]
        # Scripts load after the servers start, so the address goes into the mode spec
        # (`reverse:URL@host:port`): a changed spec is what makes mitmproxy rebind.
        host, port = S.parse_bind(self.s["bind_addr"])
        if len(modes) == 1:
            spec = mode_specs.ProxyMode.parse(modes[0])
            want = (opts.listen_host or host, opts.listen_port or port)
            if spec.custom_listen_host is None and spec.custom_listen_port is None \
                    and want != (opts.listen_host, opts.listen_port):
                modes = [f"{modes[0]}@{want[0]}:{want[1]}"]
        for m in modes:
            listen = mode_specs.ProxyMode.parse(m).listen_host(opts.listen_host)
            if not S.is_loopback(listen or "0.0.0.0") and not (self.s["gateway_api_key"] or self.s["clients"]):
                raise exceptions.OptionsError(
                    f"resp2chat: listening on {listen or 'all interfaces'} needs gateway_api_key or clients "
                    f"(clients must then send their key as a Bearer token); or bind to 127.0.0.1")
        self.warn_clear(modes, opts.listen_host)
        if modes != list(opts.mode):
            changes["mode"] = modes
            self._rebind = True
        if changes:
            opts.update(**changes)

    def certs(self, opts) -> list[str]:
        """mitmproxy's ``certs`` with the gateway's certificate for every name (or without it)."""
        own = [c for c in opts.certs if not c.endswith("/" + TLS_PEM)]
        cert, key = self.s["tls_cert_file"], self.s["tls_key_file"]
        if bool(cert) != bool(key):
            raise exceptions.OptionsError("resp2chat: tls_cert_file and tls_key_file go together: set both, or neither")
        if not cert:
            return own
        path = Path(os.path.expanduser(opts.confdir)) / TLS_PEM
        write_private(path, tls_pem(cert, key))
        self.warn_leaf(cert)
        return [*own, f"*={path}"]

    def warn_leaf(self, cert_file: str) -> None:
        """A certificate Codex CLI refuses (rustls: a CA certificate as the server's, or one that
        names no subjectAltName) where curl and the openai SDK take it: said once per file, as a
        warning, with how to make one every client takes. What `openssl req -x509 -subj
        /CN=host` makes by default is both."""
        try:
            problems = leaf_problems(Path(cert_file).expanduser().read_bytes())
        except (OSError, ValueError):  # (what cryptography cannot read further: tls_pem took it; no advice)
            return
        state = (cert_file, tuple(problems))
        if state == self._warned_cert:
            return
        self._warned_cert = state
        if problems:
            log.warning(
                f"resp2chat: WARNING: tls_cert_file {cert_file} {' and '.join(problems)}: curl and the openai SDK "
                "accept it, but Codex CLI refuses it (it only says 'Reconnecting...'). Give the gateway a leaf "
                "certificate that names its host: e.g. openssl req -x509 -newkey rsa:2048 -nodes -days 365 "
                "-keyout gw.key -out gw.crt -subj /CN=HOST -addext subjectAltName=DNS:HOST "
                "-addext basicConstraints=critical,CA:FALSE (or one your CA signed)")

    def warn_clear(self, modes: list[str], listen_host: str) -> None:
        """Beyond loopback without TLS: said once per setting, as a warning (it shows at any
        verbosity but errors)."""
        hosts = [mode_specs.ProxyMode.parse(m).listen_host(listen_host) or "0.0.0.0" for m in modes]
        outside = [h for h in hosts if not S.is_loopback(h)]
        state = (tuple(outside), bool(self.s["tls_cert_file"]))
        if state == self._warned:
            return
        self._warned = state
        if outside and not self.s["tls_cert_file"]:
            log.warning(
                f"resp2chat: WARNING: listening on {', '.join(outside)} WITHOUT TLS: the gateway key and every prompt "
                "and answer cross the network in clear text. Set tls_cert_file and tls_key_file (the gateway then "
                "serves HTTPS), or bind to 127.0.0.1 behind a proxy that terminates TLS.")

    async def running(self) -> None:
        # mitmproxy's TlsConfig makes its certificate store only when confdir (or certs…) changes,
        # or in its own running hook, after ours; client replay (-C) sends its first flow from its
        # running hook, before ours: once one of ours waits (the relay starting), that flow reaches
        # TlsConfig.request with no store ('NoneType' object has no attribute 'default_ca', an
        # error that stops the start). Saying confdir again makes the store now, before we wait
        # (only then: loading it again costs every other start ~30 ms).
        if ctx.options.client_replay:
            ctx.options.update(confdir=ctx.options.confdir)
        # mitmdump brings its servers up while scripts are still loading, with the options of
        # that moment: if we changed the mode, ask the proxy server to apply it now.
        if self._rebind and (ps := ctx.master.addons.get("proxyserver")):
            self._rebind = False
            asyncio.ensure_future(ps.setup_servers())


def tls_pem(cert_file: str, key_file: str) -> bytes:
    """The key and the certificate chain as one PEM, checked: readable, a certificate first, a
    key that matches it (``OptionsError`` naming the file otherwise; never its contents)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert_pem = Path(cert_file).expanduser().read_bytes()
        key_pem = Path(key_file).expanduser().read_bytes()
    except OSError as exc:
        raise exceptions.OptionsError(f"resp2chat: cannot read {exc.filename}: {exc.strerror}") from None
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise exceptions.OptionsError(f"resp2chat: tls_cert_file {cert_file}: no PEM certificate in it") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise exceptions.OptionsError(f"resp2chat: tls_key_file {key_file}: not an unencrypted PEM private key "
                                      f"({type(exc).__name__})") from None
    if chain[0].public_key() != key.public_key():
        raise exceptions.OptionsError(f"resp2chat: tls_key_file {key_file} is not the key of tls_cert_file {cert_file}")
    return key_pem.rstrip(b"\n") + b"\n" + cert_pem


def leaf_problems(cert_pem: bytes) -> list[str]:
    """What makes the first certificate of ``cert_pem`` unfit as a server's for every client."""
    from cryptography import x509

    leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    problems = []
    try:
        if leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            problems.append("is a CA certificate (basicConstraints CA:TRUE, openssl req -x509's default)")
    except x509.ExtensionNotFound:
        pass
    try:
        leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        problems.append("names no subjectAltName (a CN alone)")
    return problems


def write_private(path: Path, data: bytes) -> None:
    """``data`` at ``path``, mode 0600 from the start, replaced atomically."""
    if path.exists() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
