#!/bin/sh
# keepalived vrrp_script: succeeds while fastlb accepts connections on 127.0.0.1:PORT.
# A node whose fastlb died (or hangs) fails this within a second and gives up the virtual IP.
exec timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/${1:-8080}"
