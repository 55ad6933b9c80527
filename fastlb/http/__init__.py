"""HTTP/1.1 reverse proxying (`--mode http`): client protocol, backend connections, routing, errors.

protocol.py   ClientConnection: request parsing, ordering, dispatch, retries, timeouts
upstream.py   BackendConnection: response parsing and rewriting, keep-alive reuse
routing.py    Router / Rule / RoutePool: content routing and hash keys
runtime.py    HttpSettings, HttpRuntime: what a worker's HTTP connections share; the timeout sweep
headers.py    header tables and value checks
errors.py     fastlb's own answers (400, 408, 413, 414, 417, 431, 502, 503, 504)
"""
