//! The Python client (`clients/python`) against a live `strata serve`: installed into the
//! test-peer virtualenv (its gRPC stubs generated from `proto/` by the build), then its pytest
//! suite run with `STRATA_ADDR` naming the server: streaming, chat, errors with their status,
//! cancellation, eight concurrent asyncio streams and the OpenAI-shaped `Runner`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::{Server, peers_venv};

fn text(out: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `pip ARGS` in the repository root, holding a lock on the shared virtualenv.
fn pip(venv: &Path, root: &Path, args: &[&str]) {
    let out = Command::new("flock")
        .arg(venv.join(".strata-client-install.lock"))
        .arg(venv.join("bin/pip"))
        .args(["--disable-pip-version-check", "--quiet"])
        .args(args)
        .current_dir(root)
        .output()
        .expect("run pip");
    assert!(out.status.success(), "pip {args:?} failed\n{}", text(&out));
}

#[test]
fn the_python_client_suite_passes_against_a_live_server() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = peers_venv();
    let python = venv.join("bin/python");

    // The client as a user installs it (grpcio-tools and pytest are test peers in the
    // virtualenv already).
    pip(
        &venv,
        root,
        &["install", "--no-build-isolation", "./clients/python"],
    );

    let mut server = Server::start(&["serve", "--topology", "none"])
        .unwrap_or_else(|log| panic!("server failed: {log}"));
    let out = Command::new(&python)
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "clients/python/tests",
        ])
        .current_dir(root)
        .env("STRATA_ADDR", &server.addr)
        .env("STRATA_REQUIRE_SERVER", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("run pytest");
    assert!(
        out.status.success(),
        "the Python client's tests failed ({})\n{}\nserver log:\n{}",
        out.status,
        text(&out),
        server.log()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(" passed"), "{}", text(&out));

    // Streams the suite left early (cancelled, timed out) left the server healthy.
    let status = server.terminate();
    assert!(
        status.success(),
        "clean shutdown: {status}\n{}",
        server.log()
    );
}
