//! PNG writer: round trip, parameters chunk, atomic replacement, A1111 infotext.

use std::fs;
use std::path::{Path, PathBuf};

use sdcap::job::{Job, RngKind, SamplerKind, ScheduleKind};
use sdcap::output::{parameters_text, write_png, RgbImage};

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
    assert_eq!(err.exit_code(), 1);
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
fn failed_rename_removes_the_temporary_file() {
    // The target is a non-empty directory: encoding succeeds, the rename fails.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.png");
    fs::create_dir(&path).unwrap();
    fs::write(path.join("keep"), b"x").unwrap();
    let err = write_png(&path, &gradient(8, 8), "p").unwrap_err();
    assert!(err.to_string().contains("out.png"), "{err}");
    assert_eq!(entries(dir.path()), vec![path.clone()]);
    assert_eq!(entries(&path), vec![path.join("keep")]);
}

fn job() -> Job {
    Job {
        model: PathBuf::from("/models/v1-5-pruned-emaonly.safetensors"),
        vae: None,
        prompt: "a lighthouse at dusk".into(),
        negative: "blurry".into(),
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
    j.negative.clear();
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
