//! Runs the real MuseTalk worker's Python unit tests (protocol handling with MuseTalk's
//! model calls replaced at the module boundary) as part of the one test command.

use std::process::Command;

#[test]
fn musetalk_worker_protocol_unit_tests_pass() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("python3")
        .args(["-m", "unittest", "-v", "worker/test_musetalk_worker.py"])
        .current_dir(root)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("run python3 (install python3)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "python unittest failed:\n{text}");
    assert!(text.contains("OK"), "{text}");
    let ran = text.lines().find(|l| l.starts_with("Ran ")).unwrap_or_default().to_string();
    assert!(!ran.starts_with("Ran 0 "), "no test ran: {text}");
}

#[test]
fn fixture_worker_selftest_passes() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash").arg("tests/fixtures/worker/selftest.sh").current_dir(root).env("PYTHONDONTWRITEBYTECODE", "1").output().expect("bash");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "fixture worker selftest failed:\n{text}");
}
