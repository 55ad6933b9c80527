# fastlb in a container: the wheel built from the source in a first stage, then a slim runtime with only
# Python, OpenSSL's runtime library and fastlb's virtualenv, run as a non-root user.
#
#   docker/build-image.sh            # this machine: local Debian base, offline from a host wheelhouse
#   docker build --build-arg BASE=debian:bookworm-slim --build-arg PIP_OFFLINE= -t fastlb .   # with a registry and PyPI
#   docker run --network host fastlb --bind 127.0.0.1:8080 --backend 10.0.0.1:80 --admin 127.0.0.1:9000
#
# The arguments are fastlb's flags (ENTRYPOINT). SIGTERM (`docker stop`) drains as on a host: give docker
# more time than --grace-period (`docker stop -t 15`, compose's stop_grace_period), or it kills fastlb
# mid-drain. With an admin bind (--admin, or admin in --config), the health check is its /healthz.

# A Debian 12 image: a registry's debian:bookworm-slim, or one made with debootstrap (docker/build-image.sh).
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
# "--no-index": dependencies and build requirements come only from docker/wheelhouse/ (which
# docker/build-image.sh fills); empty: from PyPI as well.
ARG PIP_OFFLINE=--no-index
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      gcc libc6-dev libssl-dev libnghttp2-dev python3-dev python3-venv binutils \
 && rm -rf /var/lib/apt/lists/*
COPY docker/wheelhouse/ /wheelhouse/
COPY pyproject.toml setup.py MANIFEST.in README.md /src/
COPY fastlb/ /src/fastlb/
RUN python3 -m venv /opt/fastlb \
 && /opt/fastlb/bin/pip wheel -q $PIP_OFFLINE --find-links /wheelhouse --wheel-dir /dist /src \
 && /opt/fastlb/bin/pip install -q --no-index --find-links /dist fastlb \
 && /opt/fastlb/bin/pip uninstall -q -y pip setuptools \
 && find /opt/fastlb -name '*.so' -exec strip --strip-unneeded {} +
COPY docker/healthcheck.py /opt/fastlb/healthcheck.py

FROM ${BASE}
# python3 brings libssl3, which the TLS relay thread (fastlb/_crelay.pyx) links to; libnghttp2-14 is
# HTTP/2's (fastlb/http2/_nghttp2.pyx).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 libssl3 \
      libnghttp2-14 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* \
 && useradd --system --no-create-home --shell /usr/sbin/nologin fastlb
COPY --from=build /opt/fastlb /opt/fastlb
ENV PATH=/opt/fastlb/bin:$PATH PYTHONUNBUFFERED=1
USER fastlb
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["/opt/fastlb/bin/python", "/opt/fastlb/healthcheck.py"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["fastlb"]
CMD ["--help"]
