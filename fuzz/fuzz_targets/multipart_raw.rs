//! The fuzz input, as is, as the body of `multipart/form-data; boundary=X` POSTs to
//! `/v1/inference`, `/v1/avatars` and `/v1/avatars/{id}/speak` on the real router.
//!
//! Invariants (checked by `Harness::exercise`): no panic; no 5xx but 507; the data dir
//! holds only `jobs/` and `avatars/` with generated names; a refused upload leaves no
//! job directory.
#![no_main]

use fuzz_support::http::{SPEAK_AVATAR, harness};
use libfuzzer_sys::fuzz_target;

const CT: &str = "multipart/form-data; boundary=X";

fuzz_target!(|data: &[u8]| {
    let h = harness();
    let shown = String::from_utf8_lossy(data);
    h.exercise("/v1/inference", CT, data.to_vec(), &shown);
    h.exercise("/v1/avatars", CT, data.to_vec(), &shown);
    if h.speak_ready {
        h.exercise(
            &format!("/v1/avatars/{SPEAK_AVATAR}/speak"),
            CT,
            data.to_vec(),
            &shown,
        );
    }
});
