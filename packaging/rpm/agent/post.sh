# vigil-agent %post ($1: 1 install, 2 upgrade). Same policy as the .deb: enabled on install,
# not started (it needs certificates); an upgrade restarts it once, in %postun.
install -d -m 0755 /var/lib/vigil
install -d -m 0700 /var/lib/vigil/agent
[ -d /etc/vigil/tls ] || install -d -m 0750 /etc/vigil/tls
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ] && command -v systemctl >/dev/null 2>&1; then
  systemctl enable vigil-agent.service >/dev/null 2>&1 || :
fi
exit 0
