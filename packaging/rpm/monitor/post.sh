# vigil-monitor %post ($1: 1 install, 2 upgrade): state directory; enabled on install, not
# started (a new cluster starts with `vigil-monitor --init`).
install -d -m 0755 /var/lib/vigil
install -d -o vigil -g vigil -m 0750 /var/lib/vigil/monitor
[ -d /etc/vigil/tls ] || install -d -m 0750 -g vigil /etc/vigil/tls
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ] && command -v systemctl >/dev/null 2>&1; then
  systemctl enable vigil-monitor.service >/dev/null 2>&1 || :
fi
exit 0
