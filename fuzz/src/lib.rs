//! Shared helpers of the fuzz targets: the framed child-output format of `stage_parser`,
//! the stage-event invariant checker, and the in-process HTTP harness of the
//! `multipart_*` targets (the real router, built once per process).

pub mod frames;
pub mod http;
pub mod stages;

/// Known bugs to tolerate, so fuzzing can go on past them until they are fixed in src/:
/// `FUZZ_KNOWN_BUGS=name,name` (names are listed in fuzz/README.md). Default: none, so a
/// known bug still fails `scripts/fuzz.sh`.
pub fn known_bug(name: &str) -> bool {
    static LIST: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    LIST.get_or_init(|| {
        std::env::var("FUZZ_KNOWN_BUGS")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    })
    .iter()
    .any(|b| b == name)
}
