//! PNG writer: round trip, parameters chunk, atomic replacement, A1111 infotext.

use std::fs;
use std::path::{Path, PathBuf};

use sdcap::atomic_file::{Existing, PendingFile};
use sdcap::job::{Job, RngKind, SamplerKind, ScheduleKind};
use sdcap::output::{self, parameters_text, write_png, RgbImage};

fn gradient(width: u32, height: u32) -> RgbImage {
    let mut pixels = Vec::with_capacity((width * height * 3) as usize);
    for y in 0..height {
        for x in 0..width {
            pixels.extend_from_slice(&[(x * 7) as u8, (y * 13) as u8, (x ^ y) as u8]);
        }
    }
    RgbImage {
        width,
        height,
        pixels,
    }
}

/// Decodes a PNG: (width, height, color type, bit depth, pixels, `parameters` text if any).
fn decode(
    path: &Path,
) -> (
    u32,
    u32,
    png::ColorType,
    png::BitDepth,
    Vec<u8>,
    Option<String>,
) {
    let decoder = png::Decoder::new(fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf).unwrap();
    buf.truncate(frame.buffer_size());
    // Text chunks after IDAT are only in the info once the end has been read.
    reader.finish().unwrap();
    let info = reader.info();
    let text = info
        .uncompressed_latin1_text
        .iter()
        .find(|c| c.keyword == "parameters")
        .map(|c| c.text.clone())
        .or_else(|| {
            info.utf8_text
                .iter()
                .find(|c| c.keyword == "parameters")
                .map(|c| c.get_text().unwrap())
        });
    (
        frame.width,
        frame.height,
        frame.color_type,
        frame.bit_depth,
        buf,
        text,
    )
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn round_trip_keeps_pixels_and_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.png");
    let image = gradient(37, 21);
    let text = "a lighthouse at dusk\nSteps: 20, Sampler: Euler a";
    write_png(&path, &image, text).unwrap();

    let (w, h, color, depth, pixels, params) = decode(&path);
    assert_eq!((w, h), (37, 21));
    assert_eq!(color, png::ColorType::Rgb);
    assert_eq!(depth, png::BitDepth::Eight);
    assert_eq!(pixels, image.pixels);
    assert_eq!(params.as_deref(), Some(text));
    assert_eq!(entries(dir.path()), vec![path], "no temporary file left");
}

#[test]
fn text_beyond_latin1_goes_in_itxt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.png");
    let text = "灯台 at dusk, café\nSteps: 4";
    write_png(&path, &gradient(8, 8), text).unwrap();
    assert_eq!(decode(&path).5.as_deref(), Some(text));
}

#[test]
fn missing_directory_fails_clearly_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing").join("out.png");
    let err = write_png(&path, &gradient(8, 8), "p").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("does not exist"), "{msg}");
    assert!(msg.contains("missing"), "{msg}");
    assert_eq!(err.exit_code(), 2);
    assert!(entries(dir.path()).is_empty());
}

#[test]
fn existing_file_is_replaced_on_success() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.png");
    fs::write(&path, b"old contents").unwrap();
    let image = gradient(16, 8);
    write_png(&path, &image, "new").unwrap();
    let (_, _, _, _, pixels, params) = decode(&path);
    assert_eq!(pixels, image.pixels);
    assert_eq!(params.as_deref(), Some("new"));
    assert_eq!(entries(dir.path()), vec![path]);
}

#[test]
fn existing_file_is_kept_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.png");
    fs::write(&path, b"old contents").unwrap();
    let mut bad = gradient(16, 8);
    bad.pixels.pop();
    assert!(write_png(&path, &bad, "new").is_err());
    assert_eq!(fs::read(&path).unwrap(), b"old contents");
    assert_eq!(entries(dir.path()), vec![path]);
}

#[test]
fn a_directory_in_place_of_the_target_is_refused_and_the_temporary_file_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.png");
    fs::create_dir(&path).unwrap();
    fs::write(path.join("keep"), b"x").unwrap();
    let err = write_png(&path, &gradient(8, 8), "p").unwrap_err();
    assert!(err.to_string().contains("out.png"), "{err}");
    assert_eq!(entries(dir.path()), vec![path.clone()]);
    assert_eq!(entries(&path), vec![path.join("keep")]);

    // A directory that appears while the file is written: the move is refused, nothing stays.
    fs::remove_dir_all(&path).unwrap();
    let pending = PendingFile::create(&path, Existing::Replace).unwrap();
    output::encode(pending.file(), &gradient(8, 8), "p").unwrap();
    fs::create_dir(&path).unwrap();
    let err = pending.commit().unwrap_err();
    assert!(err.to_string().contains("is a directory"), "{err}");
    assert_eq!(entries(dir.path()), vec![path.clone()]);
}

fn job() -> Job {
    Job {
        model: PathBuf::from("/models/v1-5-pruned-emaonly.safetensors"),
        vae: None,
        prompt: "a lighthouse at dusk".into(),
        negative: Some("blurry".into()),
        width: 512,
        height: 512,
        steps: 20,
        cfg_scale: 7.0,
        sampler: SamplerKind::EulerA,
        scheduler: ScheduleKind::Discrete,
        seed: 42,
        clip_skip: 2,
        rng: RngKind::Cpu,
        ram_cap: None,
        prediction: None,
        size_cond: Default::default(),
        ..Job::new(PathBuf::new(), "")
    }
}

#[test]
fn parameters_in_a1111_format() {
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        parameters_text(&job()),
        format!(
            "a lighthouse at dusk\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, \
             Seed: 42, Size: 512x512, Model: v1-5-pruned-emaonly, Clip skip: 2, RNG: CPU, \
             Version: sdcap {version}"
        )
    );
}

#[test]
fn parameters_leave_out_defaults() {
    let mut j = job();
    j.negative = None;
    j.clip_skip = 1;
    j.cfg_scale = 7.5;
    j.width = 768;
    let text = parameters_text(&j);
    assert!(
        text.starts_with("a lighthouse at dusk\nSteps: 20, "),
        "{text}"
    );
    assert!(!text.contains("Negative prompt"), "{text}");
    assert!(!text.contains("Clip skip"), "{text}");
    assert!(text.contains("CFG scale: 7.5, "), "{text}");
    assert!(text.contains("Size: 768x512, "), "{text}");
}

#[test]
fn sampler_names_follow_a1111() {
    let cases = [
        (SamplerKind::Euler, ScheduleKind::Discrete, "Euler"),
        (SamplerKind::EulerA, ScheduleKind::Discrete, "Euler a"),
        (SamplerKind::DpmPp2m, ScheduleKind::Discrete, "DPM++ 2M"),
        (
            SamplerKind::DpmPp2m,
            ScheduleKind::Karras,
            "DPM++ 2M Karras",
        ),
        (SamplerKind::Euler, ScheduleKind::Karras, "Euler Karras"),
        (SamplerKind::Ddim, ScheduleKind::Discrete, "DDIM"),
        (SamplerKind::Ddim, ScheduleKind::Karras, "DDIM"),
        (SamplerKind::Lcm, ScheduleKind::Discrete, "LCM"),
        (SamplerKind::Heun, ScheduleKind::Discrete, "Heun"),
        (SamplerKind::Heun, ScheduleKind::Karras, "Heun Karras"),
        (
            SamplerKind::DpmPp2mSde,
            ScheduleKind::Discrete,
            "DPM++ 2M SDE",
        ),
        (
            SamplerKind::DpmPp2mSde,
            ScheduleKind::Karras,
            "DPM++ 2M SDE Karras",
        ),
        (SamplerKind::Dpm2, ScheduleKind::Discrete, "DPM2"),
        (SamplerKind::Dpm2, ScheduleKind::Karras, "DPM2 Karras"),
        (SamplerKind::UniPc, ScheduleKind::Discrete, "UniPC"),
        (SamplerKind::Lms, ScheduleKind::Discrete, "LMS"),
        (SamplerKind::Lms, ScheduleKind::Karras, "LMS Karras"),
    ];
    for (sampler, scheduler, name) in cases {
        let mut j = job();
        j.sampler = sampler;
        j.scheduler = scheduler;
        let text = parameters_text(&j);
        assert!(
            text.contains(&format!(", Sampler: {name}, ")),
            "{sampler:?} {scheduler:?}: {text}"
        );
    }
}

#[test]
fn parameters_name_the_vae() {
    let mut j = job();
    j.vae = Some(PathBuf::from(
        "/vae/vae-ft-mse-840000-ema-pruned.safetensors",
    ));
    let text = parameters_text(&j);
    assert!(
        text.contains(", VAE: vae-ft-mse-840000-ema-pruned.safetensors, "),
        "{text}"
    );
}

// --- Where outputs go: links, the temporary file, stale ones, `-o -`, full and read-only disks ---

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A symbolic link at the target is kept; the file it points to (in another directory, existing
/// or not) gets the PNG, through a temporary file in that file's directory.
#[test]
fn a_link_is_followed_and_kept() {
    let links = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let real = files.path().join("real.png");
    let link = links.path().join("out.png");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    for round in 0..2 {
        // Round 0: the link dangles, the file is created; round 1: it is replaced.
        let image = gradient(8 + round, 8);
        write_png(&link, &image, "p").unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read_link(&link).unwrap(), real);
        assert_eq!(decode(&real).4, image.pixels);
        assert_eq!(names(links.path()), ["out.png"]);
        assert_eq!(names(files.path()), ["real.png"]);
    }
    // A relative link, through a second link.
    let second = links.path().join("again.png");
    std::os::unix::fs::symlink("out.png", &second).unwrap();
    write_png(&second, &gradient(5, 5), "p").unwrap();
    assert_eq!(decode(&real).0, 5);
    assert_eq!(names(files.path()), ["real.png"]);
}

/// The temporary file exists from `create` on (so an unwritable directory is found before any
/// work) and is removed when the pending file is dropped.
#[test]
fn the_temporary_file_is_created_first_and_removed_when_abandoned() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.png");
    let pending = PendingFile::create(&path, Existing::Replace).unwrap();
    let temp = names(dir.path());
    assert_eq!(temp.len(), 1);
    assert!(
        temp[0].starts_with(&format!(".out.png.{}.", std::process::id())),
        "{temp:?}"
    );
    drop(pending);
    assert!(names(dir.path()).is_empty());
    // Keep: an existing file is refused before anything is created.
    fs::write(&path, b"x").unwrap();
    let err = PendingFile::create(&path, Existing::Keep).err().unwrap();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(names(dir.path()), ["out.png"]);
}

/// Temporary files of ours whose process is gone are removed by the next write into the
/// directory; a live process's, one whose lock is held (a writer on another host), and files that
/// only look similar stay.
#[test]
fn stale_temporary_files_are_removed_others_stay() {
    let dir = tempfile::tempdir().unwrap();
    // No process can have this PID: Linux's PID_MAX_LIMIT is 2^22.
    let dead = 4_999_999;
    let me = std::process::id();
    let stale = [
        format!(".out.png.{dead}.0.tmp"),
        format!(".other name.png.{dead}.17.tmp"),
    ];
    let kept = [
        format!(".out.png.{me}.900.tmp"),
        format!(".locked.png.{dead}.1.tmp"),
        format!("out.png.{dead}.0.tmp"),
        format!(".out.png.{dead}.x.tmp"),
        format!(".out.png.{dead}.0.tmp.bak"),
        "notes.txt".to_string(),
    ];
    for name in stale.iter().chain(&kept) {
        fs::write(dir.path().join(name), b"partial").unwrap();
    }
    let held = fs::File::open(dir.path().join(&kept[1])).unwrap();
    held.lock().unwrap();
    write_png(&dir.path().join("new.png"), &gradient(4, 4), "p").unwrap();
    let mut want: Vec<String> = kept.to_vec();
    want.push("new.png".into());
    want.sort();
    assert_eq!(names(dir.path()), want);
    drop(held);
}

const BIN: &str = env!("CARGO_BIN_EXE_sdcap");

fn generate(out: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["generate", "-p", "a red cube", "-W", "64", "-H", "64"])
        .args(["--steps", "1", "--progress", "json", "-o", out]);
    cmd
}

/// The one line that is not a JSON progress event.
fn error_line(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with('{')).collect();
    assert_eq!(lines.len(), 1, "exactly one line: {err}");
    assert!(lines[0].starts_with("sdcap: error: "), "{err}");
    lines[0].to_string()
}

/// `-o -` writes the PNG to stdout, byte for byte what `-o FILE` writes; a stdout that cannot take
/// it (/dev/full) is exit 1 with one line, its cause said once.
#[test]
fn dash_writes_the_png_to_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file.png");
    let run = generate(file.to_str().unwrap()).output().unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let piped = generate("-").output().unwrap();
    assert!(
        piped.status.success(),
        "{}",
        String::from_utf8_lossy(&piped.stderr)
    );
    assert_eq!(piped.stdout, fs::read(&file).unwrap());
    assert!(!String::from_utf8_lossy(&piped.stderr).contains("sdcap: error"));

    let full = fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let run = generate("-").stdout(full).output().unwrap();
    assert_eq!(run.status.code(), Some(1));
    let line = error_line(&run);
    let cause = std::io::Error::from_raw_os_error(libc::ENOSPC).to_string();
    assert_eq!(line.matches(&cause).count(), 1, "{line}");
}

/// A tmpfs mounted at `dir` for one test, unmounted when dropped; None (with the reason printed)
/// where mounting is not permitted.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: &Path, options: &str) -> Option<Mount> {
        let run = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir)
            .output();
        match run {
            Ok(out) if out.status.success() => Some(Mount(dir.to_path_buf())),
            Ok(out) => {
                eprintln!(
                    "skipping: cannot mount a tmpfs here ({})",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipping: cannot run mount ({e})");
                None
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A read-only directory is refused before the model is loaded (no `load` event), exit 2. Run as
/// root, which may write anywhere else, only a read-only mount shows it.
#[test]
fn a_read_only_directory_is_refused_before_loading() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("ro");
    fs::create_dir(&dir).unwrap();
    // SAFETY: geteuid has no preconditions.
    let _mount = if unsafe { libc::geteuid() } == 0 {
        match Mount::tmpfs(&dir, "ro,size=64k") {
            Some(m) => m,
            None => return,
        }
    } else {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o555)).unwrap();
        Mount(PathBuf::new())
    };
    let out = dir.join("out.png");
    let run = generate(out.to_str().unwrap()).output().unwrap();
    assert_eq!(run.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        !stderr.contains(r#""load""#),
        "refused before loading: {stderr}"
    );
    let line = error_line(&run);
    assert!(line.contains("cannot create a file in"), "{line}");
    assert!(names(&dir).is_empty());
}

/// A full filesystem: the PNG cannot be written, exit 1 with one line that says so once, and
/// neither the output nor a temporary file is left.
#[test]
fn a_full_filesystem_fails_with_one_line_and_leaves_nothing() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("full");
    fs::create_dir(&dir).unwrap();
    let Some(_mount) = Mount::tmpfs(&dir, "size=64k") else {
        return;
    };
    // Fill it.
    let mut filler = fs::File::create(dir.join("filler")).unwrap();
    let block = vec![0u8; 4096];
    while std::io::Write::write_all(&mut filler, &block).is_ok() {}
    drop(filler);
    let out = dir.join("out.png");
    let run = generate(out.to_str().unwrap()).output().unwrap();
    assert_eq!(run.status.code(), Some(1));
    let line = error_line(&run);
    let cause = std::io::Error::from_raw_os_error(libc::ENOSPC).to_string();
    assert_eq!(line.matches(&cause).count(), 1, "{line}");
    assert_eq!(names(&dir), ["filler"]);
}
