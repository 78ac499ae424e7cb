#!/usr/bin/env bash
# Install the independent DICOM programs the tests and the benchmark talk to:
# DCMTK (storescu, storescp, dcmdjpeg, dcmdjpls, ...), GDCM (gdcmconv), Orthanc with its DICOMweb plugin, Prometheus (promtool),
# podman with runc and mmdebstrap to build and run the container image on a Debian base, and
# Chromium with its driver for the status page's browser test, and PostgreSQL and HAProxy for
# the tests of several nodes sharing one queue behind one DICOM address, and rsyslog with its
# GnuTLS driver as the audit record repository (syslog over TLS, TCP and UDP).
set -euo pipefail
packages=(dcmtk libgdcm-tools orthanc orthanc-dicomweb prometheus systemd openssl podman runc mmdebstrap uidmap slirp4netns fuse-overlayfs chromium chromium-driver postgresql haproxy rsyslog rsyslog-gnutls)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "installing ${missing[*]}"
$SUDO apt-get update -qq
# the Debian packages start their own services; tests start private instances instead
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
for svc in orthanc prometheus postgresql haproxy rsyslog; do
    $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || true
done
