//! The fake `libnvidia-ml.so.1` (tests/fixtures/fake_nvml/fake_nvml.c): built once per
//! test binary with the system C compiler, loaded by the REAL binary through
//! `LD_LIBRARY_PATH`, and scripted per test by a file the test (re)writes.
#![allow(dead_code)]

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::service::ServiceBuilder;

const SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fake_nvml/fake_nvml.c");

/// The directory holding the built `libnvidia-ml.so.1` (built on first use).
pub fn lib_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Under target/ (cargo's scratch dir for integration tests); built to a name of
        // this process's own and renamed, so test binaries running at once never load
        // a half-written library.
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fake-nvml");
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join(format!("build-{}.so", std::process::id()));
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let o = Command::new(&cc)
            .args(["-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o"])
            .arg(&out)
            .arg(SOURCE)
            .args(["-lpthread", "-lm"])
            .output()
            .unwrap_or_else(|e| panic!("building the fake NVML needs a C compiler ({cc}): {e}"));
        assert!(o.status.success(), "{cc} failed on {SOURCE}:\n{}", String::from_utf8_lossy(&o.stderr));
        std::fs::rename(&out, dir.join("libnvidia-ml.so.1")).unwrap();
        dir
    })
}

/// The built library's path (for `NvmlDevices::open`-style loading by path).
pub fn lib_path() -> PathBuf {
    lib_dir().join("libnvidia-ml.so.1")
}

/// One H100 as the fake reports it: every field the sidecar reads, GPM on, a power-cap
/// throttle reason (bit 0x4) and per-process SM samples. `{procs}` is replaced by the
/// `process` lines a test wants.
pub const H100: &str = r#"driver 550.54.15
gpu 0 uuid=GPU-0b8f1c2d-fake-h100 name="NVIDIA H100 80GB HBM3" util=93 mem_util=38 enc=0 dec=4 mem_total=85520809984 mem_used=21474836480 temp=61 power_mw=412000 power_limit_mw=700000 energy_mj=5000000 pcie_rx_kbps=2048000 pcie_tx_kbps=1024000 pcie_gen=5 pcie_width=16 clock_sm=1755 clock_mem=2619 clock_sm_max=1980 clock_mem_max=2619 reasons=0x4 ecc_corr=3 ecc_uncorr=0 gpm=1 gpm_sm=88 gpm_occ=52 gpm_tensor=61 gpm_dram=35 proc_util=1
{procs}
"#;

/// The fixture pipelines as GPU processes, matched by command line: the MuseTalk fixture
/// run (2 GiB, 71 % SM) and the fixture worker (3 GiB, 5 % SM). The sidecar's own command
/// line names the worker script too, so `exe=python` keeps it out.
pub const FIXTURE_PROCS: &str = "process 0 cmdline=scripts.inference exe=python mem=2147483648 sm=71\nprocess 0 cmdline=fixture_worker.py exe=python mem=3221225472 sm=5";

/// A scripted fake NVML for one test.
pub struct FakeNvml {
    dir: tempfile::TempDir,
}

impl FakeNvml {
    pub fn new(script: &str) -> Self {
        lib_dir();
        let f = FakeNvml { dir: tempfile::Builder::new().prefix("fake-nvml-").tempdir().unwrap() };
        f.write(script);
        f
    }

    pub fn script_path(&self) -> PathBuf {
        self.dir.path().join("script")
    }

    pub fn calls_path(&self) -> PathBuf {
        self.dir.path().join("calls")
    }

    /// Replaces the script whole (temp file + rename, so the library never reads half).
    pub fn write(&self, script: &str) {
        let tmp = self.dir.path().join("script.tmp");
        std::fs::write(&tmp, script).unwrap();
        std::fs::rename(&tmp, self.script_path()).unwrap();
    }

    /// The NOT_SUPPORTED answers so far, one `"<function> <gpu index>"` each.
    pub fn unsupported_calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.calls_path()).unwrap_or_default().lines().map(str::to_string).collect()
    }

    /// The environment that makes a process load this fake as its NVML.
    pub fn env(&self) -> Vec<(OsString, OsString)> {
        let mut ld = OsString::from(lib_dir());
        if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
            ld.push(":");
            ld.push(old);
        }
        vec![
            ("LD_LIBRARY_PATH".into(), ld),
            ("FAKE_NVML_SCRIPT".into(), self.script_path().into()),
            ("FAKE_NVML_CALLS".into(), self.calls_path().into()),
        ]
    }

    /// `builder` with this fake as the service's NVML.
    pub fn apply(&self, mut builder: ServiceBuilder) -> ServiceBuilder {
        for (k, v) in self.env() {
            builder = builder.env(k, v);
        }
        builder
    }

    /// `cmd` with this fake as its NVML.
    pub fn apply_cmd<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
        cmd
    }
}
