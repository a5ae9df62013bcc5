//! Builds the first-party plugins (and the test and example plugins) for
//! wasm32-wasip2 with a nested cargo into their own target directory, and
//! puts the `.wasm` files in OUT_DIR for `include_bytes!`.
// A build script that lacks what cargo always sets can only fail the build.
#![allow(clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// One cargo invocation per plugin kind, so the SDK is built with exactly
/// one world feature for each.
const GROUPS: &[&[(&str, &str)]] = &[
    &[
        ("holdfast-plugin-router", "router.wasm"),
        ("holdfast-test-router", "test-router.wasm"),
        ("holdfast-example-alert-router", "example-alert-router.wasm"),
    ],
    &[("holdfast-plugin-auth", "auth.wasm")],
    &[
        ("holdfast-plugin-content-source", "content-source.wasm"),
        ("holdfast-test-content-source", "test-content-source.wasm"),
    ],
];

const TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .ancestors()
        .nth(2)
        .expect("crates/holdfast-plugins is inside the workspace")
        .to_path_buf();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for dir in [
        "wit",
        "sdk",
        "plugins",
        "tests/plugins",
        "examples/alert-router",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }

    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    if !target_installed(&rustc) {
        eprintln!("error: the {TARGET} target is not installed; run `rustup target add {TARGET}`");
        std::process::exit(1);
    }

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|d| if d.is_absolute() { d } else { root.join(d) })
        .unwrap_or_else(|| root.join("target"))
        .join("wasm-plugins");

    for group in GROUPS {
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(&root)
            .args([
                "build",
                "--locked",
                "--target",
                TARGET,
                "--profile",
                "plugin",
                "--target-dir",
            ])
            .arg(&target_dir);
        for (package, _) in *group {
            cmd.args(["-p", package]);
        }
        // What cargo hands a build script is meant for the host build, not this one.
        for var in [
            "RUSTFLAGS",
            "CARGO_ENCODED_RUSTFLAGS",
            "RUSTC_WORKSPACE_WRAPPER",
            "RUSTC_WRAPPER",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_TARGET",
            "CARGO_BUILD_RUSTFLAGS",
            "CARGO_PRIMARY_PACKAGE",
        ] {
            cmd.env_remove(var);
        }
        let status = cmd.status().unwrap_or_else(|e| {
            eprintln!("error: cannot run {cargo} to build the wasm plugins: {e}");
            std::process::exit(1);
        });
        if !status.success() {
            eprintln!("error: building the wasm plugins failed (see the cargo output above)");
            std::process::exit(1);
        }
        for (package, file) in *group {
            let built = target_dir
                .join(TARGET)
                .join("plugin")
                .join(format!("{}.wasm", package.replace('-', "_")));
            let dest = out_dir.join(file);
            copy(&built, &dest);
        }
    }
    println!(
        "cargo:rustc-env=HOLDFAST_TEST_ROUTER_WASM={}",
        out_dir.join("test-router.wasm").display()
    );
    println!(
        "cargo:rustc-env=HOLDFAST_TEST_CONTENT_SOURCE_WASM={}",
        out_dir.join("test-content-source.wasm").display()
    );
    println!(
        "cargo:rustc-env=HOLDFAST_EXAMPLE_ALERT_ROUTER_WASM={}",
        out_dir.join("example-alert-router.wasm").display()
    );
    println!(
        "cargo:rustc-env=HOLDFAST_AUTH_WASM={}",
        out_dir.join("auth.wasm").display()
    );
    println!("cargo:rustc-env=HOLDFAST_WASM_TARGET_DIR={}", target_dir.display());
}

fn copy(from: &Path, to: &Path) {
    if let Err(e) = std::fs::copy(from, to) {
        eprintln!("error: cannot copy {} to {}: {e}", from.display(), to.display());
        std::process::exit(1);
    }
}

fn target_installed(rustc: &str) -> bool {
    let Ok(out) = Command::new(rustc).args(["--print", "sysroot"]).output() else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Path::new(&sysroot).join("lib/rustlib").join(TARGET).is_dir()
}
