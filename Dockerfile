# The meshward image: the node agent `meshward` and the CNI plugin
# `meshward-cni`, as the Helm chart (helm/meshward) runs them.
#
#   docker build -t meshward/meshward:0.1.0 .
#
# The chart runs the agent as root with only NET_ADMIN and NET_RAW (netlink,
# nftables, the TUN device); the image's own default user is unprivileged,
# for the commands that need nothing (`meshward crd`, `meshward --help`).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# No debug info in the image (the workspace's release profile keeps some
# for benchmarks).
ENV CARGO_PROFILE_RELEASE_DEBUG=0 \
    CARGO_PROFILE_RELEASE_STRIP=debuginfo
RUN cargo build --release --locked -p meshward -p meshward-cni \
 && install -D -m 0755 -t /out target/release/meshward target/release/meshward-cni

FROM debian:bookworm-slim
# nftables: the `nft` binary the agent drives (strict mode).
# iproute2: `ip` and `tc`, for debugging from `kubectl exec`.
# containernetworking-plugins: bandwidth and portmap in /usr/lib/cni, which
#   `meshward install-cni --plugins-from /usr/lib/cni` copies to nodes
#   that lack them.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      nftables iproute2 containernetworking-plugins ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/meshward /out/meshward-cni /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["meshward"]
CMD ["--help"]
