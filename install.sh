#!/usr/bin/env bash
# Installs everything CleanFlow needs on Debian 12 (run as root, or with sudo available).
# - Mesa 25 lavapipe from bookworm-backports: SAPIEN (ManiSkill's simulator) needs a Vulkan device even
#   for state observations, and Debian 12's own Mesa 22.3 lacks descriptorBindingPartiallyBound.
# - The Python packages in requirements.txt.
set -euo pipefail
cd "$(dirname "$0")"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if command -v apt-get >/dev/null && ! python3 -c "import sapien, sys; sys.exit('llvmpipe' not in sapien.render.get_device_summary())" 2>/dev/null; then
  if [ ! -f /etc/apt/sources.list.d/backports.sources ] && grep -qs bookworm /etc/os-release; then
    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      | $SUDO tee /etc/apt/sources.list.d/backports.sources >/dev/null
  fi
  $SUDO apt-get update -qq
  if grep -qs bookworm /etc/os-release; then
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers
  else
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mesa-vulkan-drivers
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libvulkan1 libgl1 libglib2.0-0
fi
python3 -m pip install -q -r requirements.txt
python3 -c "import sapien; print(sapien.render.get_device_summary())"
