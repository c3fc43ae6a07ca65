# vigil-agent %preun ($1: 0 erase, 1 upgrade). Upgrade: nothing (never stopped). Erase: stop
# and disable, refused while the agent holds the host watchdog (stopping it resets this host
# within its timeout) unless VIGIL_ALLOW_HOST_RESET=yes.
if [ "$1" -eq 0 ]; then
  if [ -d /run/systemd/system ]; then
    pid=$(systemctl show -P MainPID vigil-agent.service 2>/dev/null || echo 0)
    if [ -n "$pid" ] && [ "$pid" != 0 ] && [ "${VIGIL_ALLOW_HOST_RESET:-}" != yes ]; then
      for fd in /proc/"$pid"/fd/*; do
        case "$(readlink "$fd" 2>/dev/null)" in
          /dev/watchdog*)
            echo "vigil-agent (pid $pid) holds the host watchdog: stopping it resets this host within its timeout." >&2
            echo "Drain the host (vigilctl host maintenance on HOST), then erase again with VIGIL_ALLOW_HOST_RESET=yes." >&2
            exit 1 ;;
        esac
      done
    fi
    systemctl stop vigil-agent.service >/dev/null 2>&1 || :
  fi
  if command -v systemctl >/dev/null 2>&1; then
    systemctl disable vigil-agent.service >/dev/null 2>&1 || :
  fi
fi
exit 0
