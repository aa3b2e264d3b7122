"""resp2chat's sans-I/O core: Responses <-> Chat Completions translation as pure functions and
state machines. Nothing here imports mitmproxy, opens a socket or reads a clock."""
