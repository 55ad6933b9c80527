#!/bin/sh
# Renders health_service.json with HashiCorp's Consul API double (npm @hashicorp/consul-api-double 6.1.5,
# served by @hashicorp/api-double 1.6.1): the shape of GET /v1/health/service/NAME answers that
# tests/consul_double.py serves (it fills in addresses, ports, tags, meta, weights and check states).
# The double itself cannot stand in for Consul in the tests: it ignores ?passing and answers a query
# with an index after a fixed 60 s whatever `wait` says; so it only provides the shape.
set -e
dir=$(mktemp -d)
cd "$dir"
npm install --no-audit --no-fund @hashicorp/api-double@1.6.1 @hashicorp/consul-api-double@6.1.5 >/dev/null
CONSUL_NODE_COUNT=2 CONSUL_CHECK_COUNT=2 CONSUL_TAG_COUNT=2 node node_modules/@hashicorp/api-double/bin/index.js \
    --dir node_modules/@hashicorp/consul-api-double --port 38555 --seed 18 >/dev/null &
pid=$!
sleep 2
curl -sf "http://127.0.0.1:38555/v1/health/service/web?passing" | python3 -m json.tool --indent 1 \
    > "$OLDPWD/health_service.json"
kill $pid
