"""resp2chat: serve the OpenAI Responses API from any Chat Completions backend.

    mitmdump -s addon/resp2chat.py --mode reverse:http://127.0.0.1:8000

This file only hands mitmproxy the addons (resp2chat_io/addons/, one class per job, in hook
order). Translation lives in the sans-I/O package ``resp2chat_core``; the path of one turn is in
docs/architecture.md.
"""

from resp2chat_io.addons import build

addons = build()
