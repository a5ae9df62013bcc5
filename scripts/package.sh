#!/usr/bin/env bash
# Builds a release tarball of Holdfast for one architecture, with its debug info in a
# separate tarball.
#
#   scripts/package.sh                                   # this machine's architecture
#   scripts/package.sh --target aarch64-unknown-linux-gnu
#   scripts/package.sh --target aarch64-unknown-linux-gnu --no-build
#
# Output in target/package/:
#   holdfast-<version>-<arch>-linux-gnu.tar.gz        bin/holdfast (no debug info; symbols
#                                                    kept for backtraces with function
#                                                    names), the systemd unit, the default
#                                                    config, README, CHANGELOG
#   holdfast-<version>-<arch>-linux-gnu-debug.tar.gz  holdfast.debug: the DWARF line tables
#                                                    the binary points to (.gnu_debuglink)
#   SHA256SUMS
#
# Cross builds need the target's C toolchain for the C parts (zstd, ring): for aarch64,
# Debian's gcc-aarch64-linux-gnu (`--install` installs it and the rustup target).
set -euo pipefail
cd "$(dirname "$0")/.."

target=""
build=1
install=0
while [ $# -gt 0 ]; do
    case "$1" in
        --target) target="$2"; shift 2 ;;
        --no-build) build=0; shift ;;
        --install) install=1; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "package.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

host=$(rustc -vV | sed -n 's/^host: //p')
target=${target:-$host}
arch=${target%%-*}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
name="holdfast-${version}-${arch}-linux-gnu"

objcopy=objcopy
strip=strip
if [ "$target" != "$host" ]; then
    case "$target" in
        aarch64-unknown-linux-gnu)
            prefix=aarch64-linux-gnu
            if [ "$install" = 1 ]; then
                if ! command -v "$prefix-gcc" >/dev/null; then
                    sudo_=""; [ "$(id -u)" = 0 ] || sudo_=sudo
                    $sudo_ apt-get update -q
                    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -q gcc-aarch64-linux-gnu libc6-dev-arm64-cross
                fi
                rustup target add "$target"
            fi
            command -v "$prefix-gcc" >/dev/null || {
                echo "package.sh: $prefix-gcc not found: apt-get install gcc-aarch64-linux-gnu (or pass --install)" >&2
                exit 1
            }
            export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=$prefix-gcc
            export CC_aarch64_unknown_linux_gnu=$prefix-gcc
            export AR_aarch64_unknown_linux_gnu=$prefix-ar
            objcopy=$prefix-objcopy
            strip=$prefix-strip
            ;;
        *) echo "package.sh: no cross toolchain recipe for $target" >&2; exit 1 ;;
    esac
fi

# A native build uses target/release, the directory every other command shares.
if [ "$target" = "$host" ]; then
    target_args=(); built=target/release/holdfast
else
    target_args=(--target "$target"); built="target/$target/release/holdfast"
fi
if [ "$build" = 1 ]; then
    cargo build --release --locked -p holdfast "${target_args[@]}"
fi
[ -x "$built" ] || { echo "package.sh: $built is missing: build it first (without --no-build)" >&2; exit 1; }

out=target/package
stage="$out/$name"
rm -rf "$stage" "$out/$name-debug"
mkdir -p "$stage/bin" "$out/$name-debug"

# The debug info goes to its own file; the shipped binary keeps its symbol table (function
# names in backtraces) and a .gnu_debuglink to holdfast.debug, which gdb and the backtrace
# printer find next to the binary or under /usr/lib/debug.
"$objcopy" --only-keep-debug "$built" "$out/$name-debug/holdfast.debug"
"$strip" --strip-debug -o "$stage/bin/holdfast" "$built"
# (objcopy records the file's name and CRC, not its path.)
"$objcopy" --add-gnu-debuglink="$out/$name-debug/holdfast.debug" "$stage/bin/holdfast"

install -m 0644 packaging/holdfast.service "$stage/holdfast.service"
install -m 0644 host/src/default-config.toml "$stage/holdfast.toml"
install -m 0644 README.md CHANGELOG.md "$stage/"

tar -C "$out" --owner=0 --group=0 -czf "$out/$name.tar.gz" "$name"
tar -C "$out" --owner=0 --group=0 -czf "$out/$name-debug.tar.gz" "$name-debug"
(cd "$out" && sha256sum "$name.tar.gz" "$name-debug.tar.gz" > "SHA256SUMS.$arch")

size() { stat -c %s "$1" | awk '{printf "%.1f MB (%d bytes)", $1 / 1e6, $1}'; }
echo "target            $target"
echo "as built          $(size "$built")"
echo "shipped binary    $(size "$stage/bin/holdfast")"
echo "tarball           $(size "$out/$name.tar.gz")  $out/$name.tar.gz"
echo "debug tarball     $(size "$out/$name-debug.tar.gz")  $out/$name-debug.tar.gz"
