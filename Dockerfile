# portico container image (`make image`): build with the pinned toolchain, run only the binary
# on distroless as non-root. The binary links glibc and libgcc only (TLS is rustls + ring;
# jemalloc is built from source and linked statically), which the distroless cc image provides.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# jemalloc's compiled-in options (JEMALLOC_SYS_WITH_MALLOC_CONF) live in .cargo/config.toml.
COPY .cargo ./.cargo
COPY src ./src
# Not built, but declared in Cargo.toml ([[bench]]): cargo refuses a manifest whose targets are
# missing, whichever target is asked for.
COPY benches ./benches
RUN cargo build --release --locked --bin portico

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/portico /portico
# 65532 is distroless's `nonroot`; the chart runs the pod as the same user.
USER 65532:65532
# HTTP, HTTPS, admin (/healthz, /readyz, /metrics); all unprivileged.
EXPOSE 8080 8443 9090
ENTRYPOINT ["/portico"]
CMD ["run"]
