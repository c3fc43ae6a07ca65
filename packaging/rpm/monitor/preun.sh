# vigil-monitor %preun ($1: 0 erase, 1 upgrade): erase stops (ExecStopPost drops the VIP)
# and disables; an upgrade does nothing here.
if [ "$1" -eq 0 ]; then
  if [ -d /run/systemd/system ]; then
    systemctl stop vigil-monitor.service >/dev/null 2>&1 || :
  fi
  if command -v systemctl >/dev/null 2>&1; then
    systemctl disable vigil-monitor.service >/dev/null 2>&1 || :
  fi
fi
exit 0
