#!/usr/bin/env bash
# peers-setup.sh -- idempotently install real DICOM peers and tools from Debian
# (bookworm): DCMTK (storescp/storescu/dcmsend/dcmmkdir/dcmdump), dicom3tools
# (dciodvfy/dcentvfy/dcdirdmp), Orthanc, GDCM tools, PostgreSQL, zstd, hyperfine.
# Safe to re-run: installs only what is missing; runs `apt-get update` only then.
# Copied from our shared tools; the project carries its own copy (.ci/run and the README use it).
# The packaged orthanc/postgresql *services* are kept from auto-starting during
# the install (policy-rc.d); tests start their own instances on free loopback
# ports with orthanc-start.sh / storescp-start.sh / pg-start.sh.
set -euo pipefail
PKGS=(dcmtk dicom3tools orthanc libgdcm-tools postgresql zstd tar hyperfine curl unzip)
missing_any() {
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || return 0
  done
  return 1
}
if [ "$(id -u)" != 0 ] && missing_any; then
  command -v sudo >/dev/null || { echo "peers-setup.sh: needs root (apt-get) to install packages" >&2; exit 1; }
  exec sudo -n bash "$0" "$@"
fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "peers-setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  policy=/usr/sbin/policy-rc.d created=0
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; created=1; fi
  trap '[ "$created" = 1 ] && rm -f "$policy"' EXIT
  apt-get update -qq
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
# On a systemd host where the orthanc service was already enabled/running it
# would hold 4242/8042; we never rely on it. Uncomment to stop it:
# systemctl disable --now orthanc 2>/dev/null || true
printf '%s\n' \
  "dcmtk       $(dpkg-query -W -f='${Version}' dcmtk)" \
  "dicom3tools $(dpkg-query -W -f='${Version}' dicom3tools)" \
  "orthanc     $(dpkg-query -W -f='${Version}' orthanc)" \
  "gdcm-tools  $(dpkg-query -W -f='${Version}' libgdcm-tools)" \
  "postgresql  $(dpkg-query -W -f='${Version}' postgresql)" \
  "zstd        $(dpkg-query -W -f='${Version}' zstd)" \
  "hyperfine   $(dpkg-query -W -f='${Version}' hyperfine)"
