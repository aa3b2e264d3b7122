"""What the relay's modules share."""

READ = 65536  # bytes one read of a relay socket takes at most (mitmproxy's side, a backend, a WebSocket client)
