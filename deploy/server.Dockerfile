# The server image: a streaming server, also the bootstrapper when given
# --topology FILE. Needs GStreamer's encoders, payloaders and the clock
# overlay for the test stream (base, good, ugly: x264enc, x: timeoverlay) and
# parsers and decoders for media files (bad, libav).
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
RUN apt-get update \
 && apt-get install -y --no-install-recommends gstreamer1.0-plugins-ugly gstreamer1.0-x \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb /var/log/apt /var/log/dpkg.log
# The plugin registry, built once here (a fresh container would otherwise
# scan every plugin, seconds, before its first pipeline starts), and a check
# that every element services/media uses on this role is there.
ENV GST_REGISTRY_1_0=/var/cache/gstreamer-1.0/registry.bin
RUN for element in \
      videotestsrc timeoverlay x264enc h264parse rtph264pay audiotestsrc opusenc opusparse \
      rtpopuspay appsink capsfilter videoconvert videoscale audioconvert audioresample \
      decodebin filesrc matroskademux qtdemux tsdemux avdec_h264; do \
      gst-inspect-1.0 "$element" >/dev/null || { echo "GStreamer element $element is missing" >&2; exit 1; }; \
    done \
 && chmod 0644 "$GST_REGISTRY_1_0"
COPY onode overlay-entrypoint /usr/local/bin/
USER overlay
WORKDIR /home/overlay
# Logs go to `docker logs`, not a terminal: no colour codes.
ENV NO_COLOR=1
EXPOSE 7070/tcp 7070/udp 7071/udp 8554/tcp 8889/tcp 8889/udp 8890/udp
# Healthy once it has registered and serves the overlay service.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 CMD ["onode", "inspect", "127.0.0.1"]
# deploy/images.sh prunes replaced images by this label.
LABEL overlay.role=server
ENTRYPOINT ["overlay-entrypoint", "onode", "server"]
