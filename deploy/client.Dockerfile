# The client image: a viewer, run headless (oclient --headless). Needs
# GStreamer's depayloaders and jitter buffer (good), h264parse (bad),
# avdec_h264 (libav) and opusdec (base).
# BASE is any Debian 12 image: by default the one deploy/base-image.sh makes
# locally (no registry needed); with a registry, e.g. debian:bookworm-slim.
# deploy/images.sh builds it from a context holding the stripped binaries
# and the entry point (deploy/entrypoint.sh).
ARG BASE=overlay-base:bookworm

# Three plugins of gstreamer1.0-plugins-bad (h264parse, opusparse, tsdemux) and
# the two libraries they link, taken from the Debian packages: the package
# itself drags in GTK, Mesa with LLVM and Vulkan (about 300 MB) that no
# role uses.
FROM ${BASE} AS plugins-bad
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && cd /tmp && apt-get download gstreamer1.0-plugins-bad libgstreamer-plugins-bad1.0-0 \
 && for deb in ./*.deb; do dpkg-deb -x "$deb" /tmp/x; done \
 && cd /tmp/x && mkdir /out \
 && cp -a --parents usr/lib/*/gstreamer-1.0/libgstvideoparsersbad.so usr/lib/*/gstreamer-1.0/libgstopusparse.so \
      usr/lib/*/gstreamer-1.0/libgstmpegtsdemux.so usr/lib/*/libgstcodecparsers-1.0.so.0* usr/lib/*/libgstmpegts-1.0.so.0* \
      usr/share/doc/gstreamer1.0-plugins-bad/copyright /out/

FROM ${BASE}
ARG DEBIAN_FRONTEND=noninteractive
# Slim like debian:bookworm-slim: no documentation, manuals or translations.
RUN printf '%s\n' "path-exclude /usr/share/doc/*" "path-include /usr/share/doc/*/copyright" \
      "path-exclude /usr/share/man/*" "path-exclude /usr/share/info/*" "path-exclude /usr/share/locale/*" \
      >/etc/dpkg/dpkg.cfg.d/overlay-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2 gstreamer1.0-tools \
      gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-libav \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb /var/log/apt /var/log/dpkg.log \
 && useradd --system --create-home --home-dir /home/overlay --uid 10001 --user-group overlay
COPY --from=plugins-bad /out/ /
RUN ldconfig
# The plugin registry, built once here (a fresh container would otherwise
# scan every plugin, seconds, before its first pipeline starts), and a check
# that every element services/media uses on this role is there.
ENV GST_REGISTRY_1_0=/var/cache/gstreamer-1.0/registry.bin
RUN for element in \
      appsrc rtpjitterbuffer rtph264depay h264parse avdec_h264 rtpopusdepay opusparse \
      opusdec videoconvert audioconvert audioresample fakesink tee queue matroskamux \
      filesink rtspsrc; do \
      gst-inspect-1.0 "$element" >/dev/null || { echo "GStreamer element $element is missing" >&2; exit 1; }; \
    done \
 && chmod 0644 "$GST_REGISTRY_1_0"
COPY oclient rtspwatch overlay-entrypoint overlay-client-health /usr/local/bin/
# Where compose mounts the stats volume (oclient --stats-json /stats/NAME.json).
RUN mkdir /stats && chown overlay:overlay /stats
USER overlay
WORKDIR /home/overlay
# Logs go to `docker logs`, not a terminal: no colour codes.
ENV NO_COLOR=1
# Healthy while media arrives.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=2 CMD ["overlay-client-health"]
# deploy/images.sh prunes replaced images by this label.
LABEL overlay.role=client
ENTRYPOINT ["overlay-entrypoint", "oclient"]
