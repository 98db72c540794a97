"""``--workers N``: several mitmproxy processes serving one port (strict proxy, record,
replay, gateway).

- ``supervisor``: the launcher's process. It holds the secret (read once from stdin), starts N
  workers, hands each the secret over a pipe, writes the server-info file once all listen,
  replaces a worker that dies, and stops them all on ``GET /shutdown`` or SIGTERM.
- ``worker``: one worker process: hardened, reads the secret from its pipe with the loader its
  launcher named (the package knows no mode), runs mitmdump.
- ``reuseport``: the one seam patched in mitmproxy: listening with ``SO_REUSEPORT``.
- ``merge``: one recording from N workers (ledger, summary, report, flows, HAR).
- ``identity_feed``: ``--github-oidc``: the supervisor renews the one workload identity and
  writes each access token to every worker over its pipe.
"""
