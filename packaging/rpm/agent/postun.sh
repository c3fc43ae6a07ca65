# vigil-agent %postun ($1: 0 erase, 1 upgrade). Upgrade: restart a running agent once.
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || :
  if [ "$1" -ge 1 ]; then
    systemctl try-restart vigil-agent.service >/dev/null 2>&1 || :
  fi
fi
exit 0
