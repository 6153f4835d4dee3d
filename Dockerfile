# ordercloud-cdp-forwarder container image.
#
#   docker build -t ordercloud-cdp-forwarder .
#   docker run -p 8080:8080 -v forwarder-data:/var/lib/forwarder \
#     -e FORWARDER__ORDERCLOUD__HASH_KEYS=... -e FORWARDER__CDP__CLIENT_KEY=... -e FORWARDER__CDP__POS=... \
#     ordercloud-cdp-forwarder
#
# Stage 1 builds the release binary; stage 2 is a slim Debian runtime with nothing but the binary,
# config/default.toml and a data folder for the SQLite store. TLS is rustls with bundled webpki roots,
# so the runtime needs neither OpenSSL nor ca-certificates.

# ---------------------------------------------------------------------------------------------------
# Builder. The slim Rust image already ships gcc and libc6-dev, which is all the C the build needs
# (ring, and SQLite bundled by libsqlite3-sys).
FROM rust:1.95-slim-bookworm AS builder

WORKDIR /build

# Dependency layer: build every dependency against a dummy crate, so that changes to src/ reuse this
# layer and only the crate itself is recompiled. (The release profile optimises the whole program as
# one unit, fat LTO: that final step, a few minutes and more memory than a plain build, runs on every
# change of src/; the layer saves the dependencies' compilation only.)
# .cargo/config.toml: how the bundled SQLite is compiled (its page caches apart), before any build.
COPY Cargo.toml Cargo.lock ./
COPY .cargo ./.cargo
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# The real sources. The SQL migrations are embedded at compile time (sqlx::migrate!), so they must be
# present here. Touch the crate roots so cargo does not reuse the dummy build's artifacts.
COPY src ./src
COPY migrations ./migrations
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && install -D -m 0755 target/release/ordercloud-cdp-forwarder /out/ordercloud-cdp-forwarder

# ---------------------------------------------------------------------------------------------------
# Runtime: same Debian release as the builder (glibc), dated tag for reproducibility.
FROM debian:bookworm-20260202-slim

LABEL org.opencontainers.image.title="ordercloud-cdp-forwarder" \
      org.opencontainers.image.description="Forwards signed Sitecore OrderCloud webhooks to the Sitecore CDP Stream API, durably and in per-shopper order." \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-20260202-slim"

# A fixed non-root uid/gid (10001) so volume ownership and Kubernetes securityContext can rely on it.
RUN groupadd --system --gid 10001 forwarder \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin forwarder \
    && mkdir -p /var/lib/forwarder \
    && chown 10001:10001 /var/lib/forwarder \
    && chmod 0750 /var/lib/forwarder

COPY --from=builder /out/ordercloud-cdp-forwarder /usr/local/bin/ordercloud-cdp-forwarder
# The service reads config/default.toml from its working directory; environment variables
# FORWARDER__SECTION__KEY override it.
COPY config/default.toml /app/config/default.toml

WORKDIR /app

# Default store: SQLite on the data volume (one replica). Several replicas need PostgreSQL:
# FORWARDER__STORE__URL=postgres://user:password@host:5432/db.
ENV FORWARDER__STORE__URL=sqlite:///var/lib/forwarder/forwarder.db

# Declared after the chown so a fresh volume starts owned by the service user.
VOLUME ["/var/lib/forwarder"]

EXPOSE 8080

# Slim images have no curl: the binary's own subcommand GETs
# http://127.0.0.1:<port of server.listen>/health/live and exits 0 on 200.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/ordercloud-cdp-forwarder", "healthcheck"]

USER 10001:10001

ENTRYPOINT ["/usr/local/bin/ordercloud-cdp-forwarder"]
CMD ["serve"]
