# The pop image: a point of presence, a relay that also serves client
# sessions. Like a relay it runs no GStreamer pipeline: core libraries only.
# BASE is any Debian 12 image: by default the one deploy/base-image.sh makes
# locally (no registry needed); with a registry, e.g. debian:bookworm-slim.
# deploy/images.sh builds it from a context holding the stripped binaries
# and the entry point (deploy/entrypoint.sh).
ARG BASE=overlay-base:bookworm
FROM ${BASE}
ARG DEBIAN_FRONTEND=noninteractive
# Slim like debian:bookworm-slim: no documentation, manuals or translations.
RUN printf '%s\n' "path-exclude /usr/share/doc/*" "path-include /usr/share/doc/*/copyright" \
      "path-exclude /usr/share/man/*" "path-exclude /usr/share/info/*" "path-exclude /usr/share/locale/*" \
      >/etc/dpkg/dpkg.cfg.d/overlay-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2 libgstreamer1.0-0 libgstreamer-plugins-base1.0-0 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb /var/log/apt /var/log/dpkg.log \
 && useradd --system --create-home --home-dir /home/overlay --uid 10001 --user-group overlay
COPY onode overlay-entrypoint /usr/local/bin/
USER overlay
WORKDIR /home/overlay
# Logs go to `docker logs`, not a terminal: no colour codes.
ENV NO_COLOR=1
EXPOSE 7070/tcp 7070/udp 7071/udp 7072/udp 8554/tcp 8889/tcp 8889/udp
# Healthy once it has registered and serves the overlay service.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 CMD ["onode", "inspect", "127.0.0.1"]
# deploy/images.sh prunes replaced images by this label.
LABEL overlay.role=pop
ENTRYPOINT ["overlay-entrypoint", "onode", "pop"]
