//! The `sdcap` binary's contract on bad input: exit 2, one line naming the problem, no output file.
//! These hold whether or not the pipeline can generate yet; nothing here runs a model.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_sdcap");

fn sdcap(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run sdcap")
}

/// A scratch directory with the output path `out.png` inside (not created).
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        Scratch {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn out(&self) -> String {
        self.path("out.png")
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    fn entries(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }

    /// A file of pseudo-random bytes: certainly not a .safetensors file.
    fn junk_file(&self, name: &str, len: usize) -> String {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 56) as u8
            })
            .collect();
        let path = self.path(name);
        fs::write(&path, bytes).unwrap();
        path
    }
}

/// Runs `generate` with `args` and checks the bad-input contract; returns the message.
fn assert_bad_input(scratch: &Scratch, args: &[&str], expect_in_message: &[&str]) -> String {
    let before = scratch.entries();
    let mut full = vec!["generate", "-p", "a lighthouse at dusk"];
    full.extend_from_slice(args);
    let out = sdcap(&full);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(2),
        "args {args:?}: stderr {stderr:?}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line on stderr, got {stderr:?}");
    assert!(lines[0].starts_with("sdcap: error: "), "{stderr:?}");
    for want in expect_in_message {
        assert!(lines[0].contains(want), "expected {want:?} in {stderr:?}");
    }
    assert!(
        out.stdout.is_empty(),
        "stdout: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(scratch.entries(), before, "no file may be created");
    lines[0].to_string()
}

#[test]
fn help_lists_the_subcommand_and_flags() {
    let out = sdcap(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("generate"), "{text}");

    let out = sdcap(&["generate", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--model",
        "--vae",
        "--prompt",
        "--negative-prompt",
        "-W, --width",
        "-H, --height",
        "--steps",
        "--cfg-scale",
        "--sampling-method",
        "--scheduler",
        "--seed",
        "--clip-skip",
        "--rng",
        "--threads",
        "--output",
        "euler_a",
        "karras",
    ] {
        assert!(text.contains(flag), "missing {flag} in help:\n{text}");
    }
}

#[test]
fn version_prints() {
    let out = sdcap(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn no_arguments_shows_usage_and_exits_2() {
    let out = sdcap(&[]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn width_not_multiple_of_8() {
    let s = Scratch::new();
    assert_bad_input(
        &s,
        &["-W", "500", "-o", &s.out()],
        &["width 500", "multiple of 8"],
    );
}

#[test]
fn height_not_multiple_of_8() {
    let s = Scratch::new();
    assert_bad_input(
        &s,
        &["-H", "100", "-o", &s.out()],
        &["height 100", "multiple of 8"],
    );
}

#[test]
fn width_out_of_range() {
    let s = Scratch::new();
    assert_bad_input(
        &s,
        &["--width", "4096", "-o", &s.out()],
        &["width 4096", "out of range"],
    );
    assert_bad_input(
        &s,
        &["--width", "8", "-o", &s.out()],
        &["width 8", "out of range"],
    );
}

#[test]
fn width_not_a_number() {
    let s = Scratch::new();
    assert_bad_input(&s, &["-W", "wide", "-o", &s.out()], &["--width"]);
    assert_bad_input(&s, &["-W", "-512", "-o", &s.out()], &["-512"]);
}

#[test]
fn steps_zero() {
    let s = Scratch::new();
    assert_bad_input(&s, &["--steps", "0", "-o", &s.out()], &["steps"]);
}

#[test]
fn cfg_scale_not_finite() {
    let s = Scratch::new();
    assert_bad_input(&s, &["--cfg-scale", "NaN", "-o", &s.out()], &["cfg-scale"]);
}

#[test]
fn clip_skip_zero() {
    let s = Scratch::new();
    assert_bad_input(&s, &["--clip-skip", "0", "-o", &s.out()], &["clip-skip"]);
}

#[test]
fn unknown_sampler() {
    let s = Scratch::new();
    let msg = assert_bad_input(
        &s,
        &["--sampling-method", "ipndm", "-o", &s.out()],
        &["unknown sampling method `ipndm`", "euler_a"],
    );
    // The list of valid names comes from the library, so it cannot drift from what runs.
    for name in sdcap::job::SamplerKind::NAMES {
        assert!(msg.contains(name), "{msg}");
    }
}

#[test]
fn unknown_scheduler() {
    let s = Scratch::new();
    assert_bad_input(
        &s,
        &["--scheduler", "exponential", "-o", &s.out()],
        &["unknown scheduler `exponential`", "karras"],
    );
}

#[test]
fn unknown_rng() {
    let s = Scratch::new();
    assert_bad_input(
        &s,
        &["--rng", "cuda", "-o", &s.out()],
        &["unknown rng `cuda`"],
    );
}

#[test]
fn threads_zero() {
    let s = Scratch::new();
    assert_bad_input(
        &s,
        &["-t", "0", "-o", &s.out()],
        &["threads must be at least 1"],
    );
}

#[test]
fn missing_prompt() {
    let s = Scratch::new();
    let out = sdcap(&["generate", "-o", &s.out()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--prompt"), "{stderr}");
    assert!(s.entries().is_empty());
}

#[test]
fn unknown_flag() {
    let s = Scratch::new();
    assert_bad_input(
        &s,
        &["--no-such-flag", "0.5", "-o", &s.out()],
        &["--no-such-flag"],
    );
}

#[test]
fn missing_model_file() {
    let s = Scratch::new();
    let model = s.path("no-such-model.safetensors");
    assert_bad_input(
        &s,
        &["-m", &model, "-o", &s.out()],
        &["no-such-model.safetensors", "not found"],
    );
}

#[test]
fn model_file_not_safetensors() {
    let s = Scratch::new();
    let model = s.junk_file("junk.safetensors", 4096);
    assert_bad_input(
        &s,
        &["-m", &model, "-o", &s.out()],
        &["junk.safetensors", "not a valid .safetensors"],
    );
    let empty = s.junk_file("empty.safetensors", 0);
    assert_bad_input(
        &s,
        &["-m", &empty, "-o", &s.out()],
        &["empty.safetensors", "not a valid .safetensors"],
    );
}

#[test]
fn missing_vae_file() {
    let s = Scratch::new();
    let vae = s.path("no-such-vae.safetensors");
    assert_bad_input(
        &s,
        &["--vae", &vae, "-o", &s.out()],
        &["no-such-vae.safetensors", "not found"],
    );
}

#[test]
fn output_directory_missing() {
    let s = Scratch::new();
    let out = s.path("missing/out.png");
    assert_bad_input(
        &s,
        &["-o", &out],
        &["output directory", "missing", "does not exist"],
    );
}

#[test]
fn output_is_a_directory() {
    let s = Scratch::new();
    let out = s.path("folder");
    fs::create_dir(&out).unwrap();
    assert_bad_input(&s, &["-o", &out], &["is a directory"]);
    assert!(fs::read_dir(&out).unwrap().next().is_none());
}

#[test]
fn failed_run_keeps_an_existing_output() {
    let s = Scratch::new();
    fs::write(s.out(), b"previous image").unwrap();
    let model = s.junk_file("junk.safetensors", 100);
    assert_bad_input(
        &s,
        &["-m", &model, "-o", &s.out()],
        &["not a valid .safetensors"],
    );
    assert_eq!(fs::read(s.out()).unwrap(), b"previous image");
}

#[test]
fn checks_run_before_the_default_model_notice() {
    // A bad request with no -m gets only its error line, not the demo-model notice too.
    let s = Scratch::new();
    let msg = assert_bad_input(&s, &["--steps", "0", "-o", &s.out()], &[]);
    assert!(!msg.contains("demo model"), "{msg}");
}

/// Runs `sdcap ARGS`, failing the test if it has not ended within 30 s (a FIFO opened for reading
/// would block forever).
fn sdcap_promptly(args: &[&str]) -> Output {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sdcap");
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sdcap {args:?} still running after 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn assert_one_line_exit_2(out: &Output, what: &str, want: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{what}: {stderr}");
    assert!(stderr.starts_with("sdcap: error: "), "{what}: {stderr}");
    for w in want {
        assert!(stderr.contains(w), "{what}: expected {w:?} in {stderr}");
    }
}

fn mkfifo(path: &str) {
    let c = std::ffi::CString::new(path).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o644) },
        0,
        "mkfifo {path}"
    );
}

/// `mknod PATH c 1 3` (a /dev/null twin); false where it is not permitted (not root, no CAP_MKNOD).
fn mknod_null(path: &str) -> bool {
    let c = std::ffi::CString::new(path).unwrap();
    // SAFETY: a valid NUL-terminated path; the node is made in a scratch directory.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    if rc != 0 {
        eprintln!(
            "skipping the device-node case: mknod is not permitted here ({})",
            std::io::Error::last_os_error()
        );
    }
    rc == 0
}

fn file_kind(path: &str) -> fs::FileType {
    fs::symlink_metadata(path).unwrap().file_type()
}

/// An existing output that is not a regular file (a device, a FIFO, a socket, a link to one, and
/// /dev/full) is refused at once with exit 2 and left as it was; no temporary file stays.
#[test]
fn output_that_is_not_a_regular_file_is_refused() {
    use std::os::unix::fs::FileTypeExt;
    let s = Scratch::new();
    let fifo = s.path("fifo.png");
    mkfifo(&fifo);
    let socket = s.path("socket.png");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let link = s.path("link.png");
    std::os::unix::fs::symlink(&fifo, &link).unwrap();
    let mut targets = vec![
        (fifo.clone(), "a FIFO"),
        (socket.clone(), "a socket"),
        (link.clone(), "a link to"),
        ("/dev/full".to_string(), "a character device"),
    ];
    let device = s.path("device.png");
    if mknod_null(&device) {
        targets.push((device.clone(), "a character device"));
    }
    let before = s.entries();
    for (target, kind) in &targets {
        for cmd in [
            vec![
                "generate", "-p", "x", "-W", "64", "-H", "64", "--steps", "1",
            ],
            vec!["quantize", "-m", super_tiny(), "--type", "q8_0", "--force"],
        ] {
            let mut args = cmd.clone();
            args.extend(["-o", target.as_str()]);
            let out = sdcap_promptly(&args);
            assert_one_line_exit_2(&out, target, &["not a regular file", kind]);
            assert!(out.stdout.is_empty());
        }
        assert_eq!(s.entries(), before, "{target}: nothing created or removed");
    }
    assert!(file_kind(&fifo).is_fifo());
    assert!(file_kind(&socket).is_socket());
    assert!(file_kind(&link).is_symlink());
    assert!(file_kind("/dev/full").is_char_device());
    if targets.len() == 5 {
        assert!(file_kind(&device).is_char_device());
    }
}

fn super_tiny() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-sd.safetensors")
}

/// A FIFO (or a device) given as the model or VAE is refused at once, never opened.
#[test]
fn model_that_is_not_a_regular_file_or_directory() {
    let s = Scratch::new();
    let fifo = s.path("model.safetensors");
    mkfifo(&fifo);
    let out = s.out();
    let cases: Vec<Vec<&str>> = vec![
        vec!["inspect", &fifo],
        vec!["generate", "-p", "x", "-m", &fifo, "-o", &out],
        vec!["plan", "-p", "x", "-m", &fifo],
        vec!["generate", "-p", "x", "--vae", &fifo, "-o", &out],
        vec!["quantize", "-m", &fifo, "-o", &out, "--type", "q8_0"],
        vec!["inspect", "/dev/zero"],
    ];
    for args in cases {
        let run = sdcap_promptly(&args);
        assert_one_line_exit_2(
            &run,
            &format!("{args:?}"),
            &["not a regular file or directory"],
        );
    }
    assert!(!std::path::Path::new(&out).exists());
}
