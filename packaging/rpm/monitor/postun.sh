# vigil-monitor %postun ($1: 0 erase, 1 upgrade): an upgrade restarts a running monitor once.
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || :
  if [ "$1" -ge 1 ]; then
    systemctl try-restart vigil-monitor.service >/dev/null 2>&1 || :
  fi
fi
exit 0
