# For those with a registry: the same image as scripts/image.sh builds
# from this machine's own build (a scratch image holding the binary, the
# shared libraries it links, and the unprivileged user 10001), built here
# on official images. This machine has no registry, so it is not tested
# here; scripts/image.sh is (crates/cli/tests/container.rs).
#   docker build -t scaleout .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p scaleout \
 && mkdir -p /out/root/usr/local/bin /out/root/etc /out/data /out/tmp \
 && objcopy --strip-debug target/release/scaleout /out/root/usr/local/bin/scaleout \
 && for lib in $(ldd target/release/scaleout | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u); do \
      mkdir -p "/out/root$(dirname "$lib")" && cp -L "$lib" "/out/root$lib"; \
    done \
 && printf 'root:x:0:0:root:/:/sbin/nologin\nscaleout:x:10001:10001:scaleout:/data:/sbin/nologin\n' >/out/root/etc/passwd \
 && printf 'root:x:0:\nscaleout:x:10001:\n' >/out/root/etc/group

FROM scratch
COPY --from=build /out/root/ /
COPY --from=build --chown=10001:10001 /out/data /data
COPY --from=build --chown=10001:10001 /out/tmp /tmp
USER 10001:10001
WORKDIR /data
VOLUME /data
ENTRYPOINT ["/usr/local/bin/scaleout"]
CMD ["--help"]
