//! Helpers for the end-to-end tests: run the real `strait` binary and real
//! tools (openssl) in a scratch directory.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The output of one command, with the checks tests need.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub what: String,
}

impl Run {
    fn from(what: String, out: Output) -> Self {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            what,
        }
    }

    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "{} failed\nstdout:\n{}\nstderr:\n{}",
            self.what, self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    pub fn fails_with(self, code: i32, needle: &str) -> Self {
        assert_eq!(
            self.code, code,
            "{}: expected exit {code}\nstdout:\n{}\nstderr:\n{}",
            self.what, self.stdout, self.stderr
        );
        assert!(
            self.stderr.contains(needle) || self.stdout.contains(needle),
            "{}: expected {needle:?} in the output\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// A scratch directory in which commands run.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        Scratch {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, data: &str) -> PathBuf {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, data).unwrap();
        p
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap()
    }

    /// Runs `strait ARGS...` here.
    pub fn strait(&self, args: &[&str]) -> Run {
        self.run(env!("CARGO_BIN_EXE_strait"), args)
    }

    /// Runs `openssl ARGS...` here. The tests need the real openssl: its
    /// absence is a failure (the test script installs it), not a skip.
    pub fn openssl(&self, args: &[&str]) -> Run {
        self.run("openssl", args)
    }

    pub fn run(&self, program: &str, args: &[&str]) -> Run {
        let out = Command::new(program)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e} (is it installed?)"));
        Run::from(format!("{program} {}", args.join(" ")), out)
    }
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}
