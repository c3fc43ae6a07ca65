# vigil-monitor %pre: the `vigil` system user.
getent group vigil >/dev/null || groupadd --system vigil
getent passwd vigil >/dev/null || useradd --system --gid vigil --home-dir /var/lib/vigil \
  --no-create-home --shell /sbin/nologin --comment "Vigil monitor" vigil
exit 0
