# ridley's image: built on Debian 12 with the same toolchain route as scripts/setup.sh
# (Debian's rustc-web with a prebuilt `core` for bpfel-unknown-none, bpf-linker against
# the same LLVM), run on debian:bookworm-slim with nothing but the stripped binary.
#
#   make image                      # podman or docker, whichever exists
#   podman build -t ridley .        # the same by hand
#
# The `prebuilt` target packs a binary built elsewhere (the tests use it with the binary
# their suite already built): podman build --target prebuilt -f Dockerfile <dir with ridley>

FROM debian:bookworm-slim AS toolchain
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates gcc libc6-dev make \
      rustc-web cargo-web libstd-rust-web-dev-bpf libllvm22 \
 && rm -rf /var/lib/apt/lists/* \
 # Extra CAs of the building machine (a TLS-inspecting proxy), when `make image`
 # mounts them at build time; nothing otherwise. Build stages only.
 && update-ca-certificates
# bpf-linker must link with the same LLVM major as rustc-web (22).
RUN mkdir -p /opt/llvm22/lib \
 && ln -sf /usr/lib/x86_64-linux-gnu/libLLVM.so.22.1 /opt/llvm22/lib/libLLVM.so \
 && LLVM_PREFIX=/opt/llvm22 cargo install --locked bpf-linker@0.13.0 \
      --no-default-features --features llvm-22 --root /usr/local

FROM toolchain AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p receiver \
 && mkdir -p /out \
 && objcopy --only-keep-debug target/release/ridley /out/ridley.debug \
 && strip -o /out/ridley target/release/ridley

FROM debian:bookworm-slim AS runtime-base
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="ridley" \
      org.opencontainers.image.description="eBPF service-map receiver: TCP links from the kernel, exported as OpenTelemetry metrics and service-graph spans" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/ridley-observability/ridley" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["/usr/local/bin/ridley"]
CMD ["run", "--config", "/etc/ridley/ridley.yaml"]

FROM runtime-base AS prebuilt
COPY ridley /usr/local/bin/ridley

FROM runtime-base AS runtime
COPY --from=build /out/ridley /usr/local/bin/ridley
