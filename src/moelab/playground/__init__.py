"""`moelab playground`: the interactive MoE lab in the browser (size it, route it, break it,
compare it), served locally by FastAPI + uvicorn.

The JSON API (`moelab.playground.app.create_app`) is the contract, documented in
docs/playground.md; the page in ``static/`` is plain HTML/CSS/JS that only shows what the
API returns. Every number comes from the library (`moelab.accounting`, `moelab.lab`), never
from JavaScript. One module per panel: `sizing`, `route`, `runs` (+ `worker`, the training
subprocess), `compare`; `config` holds the server's settings and the folder guard.
"""
