# metaload container: build stage compiles Release with the same Debian packages as
# deploy/install-deps.sh (it runs that script); the runtime stage carries only shared libraries
# and the two binaries, and runs as a non-root user.
#
#   docker build -t metaload .
#   docker run -p 127.0.0.1:50051:50051 -p 127.0.0.1:9464:9464 -v $PWD/models:/models metaload

# GPU images: BUILD_IMAGE/RUNTIME_IMAGE and TORCH_PREFIX let the build use a CUDA LibTorch
# instead of Debian's CPU-only one (see README "Deploy", GPU notes).
ARG BUILD_IMAGE=debian:12-slim
ARG RUNTIME_IMAGE=debian:12-slim

FROM ${BUILD_IMAGE} AS build
ARG TORCH_PREFIX=
WORKDIR /src
COPY deploy/install-deps.sh deploy/packages.txt deploy/
RUN ./deploy/install-deps.sh && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cmake -S . -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release \
      ${TORCH_PREFIX:+-DCMAKE_PREFIX_PATH=${TORCH_PREFIX}} \
 && cmake --build /build --target metaloadd metaload \
 && strip /build/server/metaloadd /build/client/metaload

FROM ${RUNTIME_IMAGE} AS runtime
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libtorch1.13 libgrpc++1.51 libprotobuf32 libabsl20220623 \
      libprometheus-cpp-core1.0 libmicrohttpd12 libsimdjson14 libopenblas0-openmp libssl3 \
      ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin metaload \
 && mkdir -p /models /state && chown metaload /models /state
COPY --from=build /build/server/metaloadd /build/client/metaload /usr/local/bin/
USER metaload
EXPOSE 50051 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["metaload", "health", "--address=127.0.0.1:50051", "--timeout=2"]
ENTRYPOINT ["metaloadd", "--listen=0.0.0.0:50051", "--metrics_listen=0.0.0.0:9464", "--model_root=/models"]
