#!/bin/sh
# keepalived vrrp_script: check_fastlb.sh TRAFFIC_PORT [ADMIN_PORT]
# Succeeds while fastlb accepts connections on 127.0.0.1:TRAFFIC_PORT and, when fastlb runs with
# --admin 127.0.0.1:ADMIN_PORT, its /healthz answers 200. A node whose fastlb died or hangs fails
# within a second and gives up the virtual IP.
traffic=${1:-8080}
admin=$2
timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$traffic" || exit 1
[ -z "$admin" ] && exit 0
exec timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$admin
printf 'GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
head -c 12 <&3 | grep -q '^HTTP/1.[01] 200'"
