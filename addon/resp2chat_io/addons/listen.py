"""Listen defaults: a gateway, not a proxy.

mitmproxy's defaults are a proxy's: listen on all interfaces at 8080, connect upstream eagerly.
This addon makes them a gateway's: ``bind_addr`` (loopback by default; beyond loopback only with
``gateway_api_key``), reverse mode to the upstream, lazy upstream connections (eager would reset
clients when the upstream is down), ``store_streamed_bodies`` (flow files keep the translated
stream), and server replay that ignores the recorded upstream address.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from mitmproxy import ctx, exceptions
from mitmproxy.proxy import mode_specs

from resp2chat_core import settings as S

from .base import Owner


class Listen(Owner):
    name = "resp2chat_listen"
    owner = "listen"
    also_reads = ("gateway_api_key", "upstream_base_url")
    watches = ("mode", "listen_host", "listen_port", "server_replay", "connection_strategy",
               "store_streamed_bodies", "server_replay_ignore_host", "server_replay_ignore_port")

    def __init__(self, source, upstreams) -> None:
        super().__init__(source)
        self.upstreams = upstreams
        self._rebind = False

    def apply(self, updated: set[str]) -> None:
        opts, changes = ctx.options, {}
        if "connection_strategy" not in opts:
            return  # not inside a proxy (unit tests with a bare options manager)
        if opts.connection_strategy != "lazy":
            changes["connection_strategy"] = "lazy"
        if not opts.store_streamed_bodies:
            changes["store_streamed_bodies"] = True
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
            if not S.is_loopback(listen or "0.0.0.0") and not self.s["gateway_api_key"]:
                raise exceptions.OptionsError(
                    f"resp2chat: listening on {listen or 'all interfaces'} needs gateway_api_key "
                    f"(clients must then send it as a Bearer token); or bind to 127.0.0.1")
        if modes != list(opts.mode):
            changes["mode"] = modes
            self._rebind = True
        if changes:
            opts.update(**changes)

    async def running(self) -> None:
        # mitmdump brings its servers up while scripts are still loading, with the options of
        # that moment: if we changed the mode, ask the proxy server to apply it now.
        if self._rebind and (ps := ctx.master.addons.get("proxyserver")):
            self._rebind = False
            asyncio.ensure_future(ps.setup_servers())
