"""resp2chat's I/O side: everything around the core that touches sockets, files, processes or
mitmproxy — the upstream relay, the response store, config files, the CLI, mitmweb views, and
the demo upstream."""
