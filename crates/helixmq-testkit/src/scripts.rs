//! The repository and its scripts: the root, `scripts/<name>` (optionally
//! under a lock, for scripts that must not run twice at once), `rabbitmqctl`,
//! random suffixes for names.

use std::path::PathBuf;
use std::process::Command;

/// The repository root (two levels above this crate's manifest).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root exists")
}

/// Run `scripts/<name> args…` from the repository root; panics with its output on failure.
pub fn script(name: &str, args: &[&str]) -> String {
    let out = Command::new(repo_root().join("scripts").join(name))
        .args(args)
        .current_dir(repo_root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run scripts/{name}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "scripts/{name} {args:?} failed:\n{text}"
    );
    text
}

/// [`script`] under an exclusive `flock` on `target/<lock>.lock`: nextest runs
/// each test in its own process, and scripts that make certificates or start a
/// node must not run twice at once.
pub fn script_locked(lock: &str, name: &str, args: &[&str]) -> String {
    let lockfile = repo_root().join("target").join(format!("{lock}.lock"));
    // `-o`: the lock stays with flock itself, not inherited by the script's
    // children. Without it a node started under the lock (rabbitmq-server
    // -detached) kept the lock for its whole life and every later caller
    // waited forever. `-w`: fail instead of hanging if it is held anyway.
    let out = Command::new("flock")
        .args(["-o", "-w", "300"])
        .arg(&lockfile)
        .arg(repo_root().join("scripts").join(name))
        .args(args)
        .current_dir(repo_root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run flock scripts/{name}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "scripts/{name} {args:?} failed:\n{text}"
    );
    text
}

/// `rabbitmqctl -q [-n node] args…`; returns stdout, panics with stderr on failure.
pub fn rabbitmqctl(node: Option<&str>, args: &[&str]) -> String {
    let mut cmd = Command::new("rabbitmqctl");
    cmd.arg("-q");
    if let Some(n) = node {
        cmd.args(["-n", n]);
    }
    let out = cmd.args(args).output().expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Eight random hex digits.
pub fn random_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}
