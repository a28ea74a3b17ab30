//! img2img / inpaint input (`sdcap::init_image`): diffusers' preprocessing bit for bit, PIL's
//! Lanczos resize and grey conversion (references made by `tests/pil/make_pil_refs.py` with
//! Pillow 13), EXIF orientation, colour types, the size rule, refusals of bad files, and the
//! memory `load` is predicted to take.

mod common;

use common::counting::{measured, serial, Counting};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sdcap::error::Error;
use sdcap::init_image::{self, Channels};
use sdcap::job::Job;
use sdcap::Tensor;

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn inputs() -> PathBuf {
    common::fixtures().join("tiny-sd/workflows/inputs")
}

/// Our own references (not from the shared fixtures): `tests/pil/README.md`.
fn pil(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/pil")
        .join(name)
}

fn pil_refs() -> HashMap<String, Tensor> {
    common::read_tensors(&pil("pil_refs.safetensors"))
}

fn job(image: Option<PathBuf>, mask: Option<PathBuf>, (w, h): (u32, u32)) -> Job {
    let mut job = Job::new(PathBuf::from("unused.safetensors"), "x");
    (job.init_image, job.mask, job.width, job.height) = (image, mask, w, h);
    job
}

/// `u8 / 255 · 2 − 1` in f32 of an interleaved [h, w, 3] reference, as [1, 3, h, w].
fn preprocessed(reference: &Tensor) -> Vec<f32> {
    let (h, w) = (reference.shape[0], reference.shape[1]);
    (0..3)
        .flat_map(|c| (0..h * w).map(move |i| (c, i)))
        .map(|(c, i)| 2.0 * (reference.data[i * 3 + c] / 255.0) - 1.0)
        .collect()
}

#[test]
fn init_images_are_diffusers_preprocess_bit_for_bit() {
    let _serial = serial();
    let common = common::read_tensors(
        &common::fixtures().join("tiny-sd/workflows/img2img/common.safetensors"),
    );
    for (w, h) in [(64, 64), (64, 96)] {
        let path = inputs().join(format!("init_{w}x{h}.png"));
        let loaded = init_image::load(&job(Some(path), None, (w, h)))
            .unwrap()
            .unwrap();
        let want = &common[&format!("init_image_{w}x{h}")];
        assert_eq!(loaded.image.shape, want.shape);
        assert_eq!(loaded.image.data, want.data, "{w}x{h}");
        assert_eq!(loaded.resized_from, None);
        assert_eq!(loaded.notice(), None);
        assert!(loaded.mask.is_none());
    }
    assert!(init_image::load(&job(None, None, (64, 64)))
        .unwrap()
        .is_none());
}

/// Down, up, one side only, and below the source on both sides: the same bytes as PIL.
#[test]
fn resize_is_pil_lanczos_bit_for_bit() {
    let _serial = serial();
    let refs = pil_refs();
    for (w, h) in [(40, 56), (80, 128), (64, 72), (48, 96), (24, 16)] {
        let path = inputs().join("init_64x96.png");
        let loaded = init_image::load(&job(Some(path), None, (w, h)))
            .unwrap()
            .unwrap();
        let want = &refs[&format!("init_64x96_to_{w}x{h}")];
        assert_eq!(loaded.image.shape, [1, 3, h as usize, w as usize]);
        assert_eq!(loaded.image.data, preprocessed(want), "{w}x{h}");
        assert_eq!(loaded.resized_from, Some((64, 96)));
        assert_eq!(
            loaded.notice().unwrap(),
            format!("init image resized from 64x96 to {w}x{h}")
        );
    }
}

/// The mask: grey, Lanczos-resized in mode "L" when the size differs, binarised at 0.5 (128 → 1,
/// 127 → 0), as diffusers' `mask_processor`.
#[test]
fn mask_is_resized_then_binarised_like_diffusers() {
    let _serial = serial();
    let refs = pil_refs();
    let stored = common::read_tensors(&inputs().join("inputs.safetensors"));
    let binarised = |t: &Tensor| -> Vec<f32> {
        t.data
            .iter()
            .map(|&v| if v >= 128.0 { 1.0 } else { 0.0 })
            .collect()
    };
    let image = Some(inputs().join("init_64x64.png"));
    let mask = Some(inputs().join("mask_64x64.png"));
    let same = init_image::load(&job(image.clone(), mask.clone(), (64, 64)))
        .unwrap()
        .unwrap()
        .mask
        .unwrap();
    assert_eq!(same.shape, [1, 1, 64, 64]);
    assert_eq!(same.data, binarised(&stored["mask_64x64"]));
    // The fixture's grey tabs: 128 at x 45..49, y 28..44 repaints, 127 at x 8..13, y 36..44 keeps.
    assert_eq!(same.data[30 * 64 + 46], 1.0);
    assert_eq!(same.data[40 * 64 + 10], 0.0);
    for (w, h) in [(40, 40), (96, 80)] {
        let resized = init_image::load(&job(image.clone(), mask.clone(), (w, h)))
            .unwrap()
            .unwrap()
            .mask
            .unwrap();
        assert_eq!(resized.shape, [1, 1, h as usize, w as usize]);
        assert_eq!(
            resized.data,
            binarised(&refs[&format!("mask_64x64_to_{w}x{h}")]),
            "{w}x{h}"
        );
    }
    // A colour mask is made grey with PIL's convert("L").
    let (grey, size) = init_image::decode(&pil("mask_rgb.png"), Channels::Grey).unwrap();
    assert_eq!(size, (64, 64));
    let want: Vec<u8> = refs["mask_rgb_L"].data.iter().map(|&v| v as u8).collect();
    assert_eq!(grey, want);
}

fn as_u8(t: &Tensor) -> Vec<u8> {
    t.data.iter().map(|&v| v as u8).collect()
}

#[test]
fn exif_orientation_is_honoured_in_png_and_jpeg() {
    let _serial = serial();
    let refs = pil_refs();
    // Stored 16 wide × 24 high with orientation 6 (turn 90° clockwise to show): shown 24 × 16.
    let (png, size) = init_image::decode(&pil("orient6.png"), Channels::Rgb).unwrap();
    assert_eq!(size, (24, 16));
    assert_eq!(png, as_u8(&refs["orient6_png"]));
    let header = init_image::read_header(&pil("orient6.png")).unwrap();
    assert_eq!((header.width, header.height), (24, 16));
    // The same JPEG scan without and with the tag: the tagged one is the plain one turned.
    let (plain, plain_size) = init_image::decode(&pil("orient1.jpg"), Channels::Rgb).unwrap();
    let (turned, turned_size) = init_image::decode(&pil("orient6.jpg"), Channels::Rgb).unwrap();
    assert_eq!((plain_size, turned_size), ((16, 24), (24, 16)));
    let (sw, sh) = (16usize, 24usize);
    let mut want = vec![0u8; plain.len()];
    for y in 0..sh {
        for x in 0..sw {
            // Clockwise: stored (x, y) is shown at (sh − 1 − y, x) in a sh-wide picture.
            let (dx, dy) = (sh - 1 - y, x);
            want[(dy * sh + dx) * 3..][..3].copy_from_slice(&plain[(y * sw + x) * 3..][..3]);
        }
    }
    assert_eq!(turned, want);
    assert_eq!(
        init_image::default_size(&pil("orient6.jpg")).unwrap(),
        (64, 64)
    );
}

#[test]
fn alpha_is_dropped_and_16_bit_rounded() {
    let _serial = serial();
    let refs = pil_refs();
    let (rgb, size) = init_image::decode(&pil("rgba.png"), Channels::Rgb).unwrap();
    assert_eq!(size, (24, 16));
    let rgba = as_u8(&refs["rgba"]);
    let want: Vec<u8> = rgba.chunks(4).flat_map(|p| [p[0], p[1], p[2]]).collect();
    assert_eq!(rgb, want);
    let (grey, size) = init_image::decode(&pil("grey16.png"), Channels::Grey).unwrap();
    assert_eq!(size, (24, 16));
    let bytes = as_u8(&refs["grey16"]);
    for (i, (&g, v)) in grey.iter().zip(bytes.chunks(2)).enumerate() {
        let v = u16::from_le_bytes([v[0], v[1]]);
        let want = (v as f64 / 257.0).round() as u8;
        assert_eq!(g, want, "pixel {i}: {v}");
    }
}

#[test]
fn size_without_width_and_height_is_the_pictures_rounded_down() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    for ((w, h), want) in [
        ((100, 70), (96, 64)),
        ((64, 96), (64, 96)),
        ((30, 200), (64, 200)),
        // Above 2048 a side: scaled down to it first, aspect kept (100 · 2048/4100 = 49.95).
        ((4100, 100), (2048, 64)),
        ((1000, 3000), (680, 2048)),
    ] {
        let path = dir.path().join(format!("{w}x{h}.png"));
        write_png(&path, w, h);
        assert_eq!(init_image::default_size(&path).unwrap(), want, "{w}x{h}");
        let loaded = init_image::load(&job(Some(path), None, want))
            .unwrap()
            .unwrap();
        let resized = (w, h) != want;
        assert_eq!(loaded.resized_from, resized.then_some((w, h)));
    }
}

fn write_png(path: &Path, w: u32, h: u32) {
    let file = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(file, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let pixels: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
    enc.write_header()
        .unwrap()
        .write_image_data(&pixels)
        .unwrap();
}

/// A PNG signature and IHDR chunk declaring `w × h` RGB, then `rest` (an IDAT chunk's start
/// makes the header complete: decoders read up to the first IDAT).
fn png_header(w: u32, h: u32, rest: &[u8]) -> Vec<u8> {
    let mut chunk = b"IHDR".to_vec();
    chunk.extend(w.to_be_bytes());
    chunk.extend(h.to_be_bytes());
    chunk.extend([8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(13u32.to_be_bytes());
    out.extend(&chunk);
    out.extend(common::crc32(&chunk).to_be_bytes());
    out.extend(rest);
    out
}

/// The start of an IDAT chunk of 1000 bytes, cut short.
const IDAT_START: &[u8] = b"\x00\x00\x03\xe8IDAT\x78\x9c";

/// A JPEG that declares `w × h` in its frame header and holds no scan.
fn jpeg_header(w: u16, h: u16) -> Vec<u8> {
    let mut out = vec![0xFF, 0xD8, 0xFF, 0xC0, 0, 17, 8];
    out.extend(h.to_be_bytes());
    out.extend(w.to_be_bytes());
    out.extend([3, 1, 0x11, 0, 2, 0x11, 0, 3, 0x11, 0]);
    out.extend([0xFF, 0xD9]);
    out
}

fn refused(job: &Job) -> String {
    let (err, peak) = measured(|| init_image::check(job).expect_err("refused"));
    // Nothing in proportion to a declared size is allocated to refuse it.
    assert!(peak < 4 << 20, "{peak} bytes to refuse: {err}");
    assert_eq!(err.exit_code(), 2, "{err}");
    let line = err.to_string();
    assert!(!line.contains('\n'), "{line}");
    line
}

#[test]
fn bad_input_is_refused_in_one_line_before_the_model_loads() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let good = inputs().join("init_64x64.png");
    let image = |path: PathBuf| job(Some(path), None, (64, 64));
    assert!(init_image::check(&image(good.clone())).is_ok());
    assert!(init_image::check(&job(None, None, (64, 64))).is_ok());

    let missing = refused(&image(dir.path().join("nope.png")));
    assert!(
        missing.contains("nope.png") && missing.contains("cannot read"),
        "{missing}"
    );
    assert!(refused(&image(dir.path().to_path_buf())).contains("not a regular file"));
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    assert!(refused(&image(fifo)).contains("not a regular file"));
    let text = file("notes.png", b"not a picture at all");
    assert!(refused(&image(text)).contains("not a PNG or JPEG"));
    let empty = file("empty.jpg", b"");
    assert!(refused(&image(empty)).contains("not a PNG or JPEG"));

    // Truncated PNG: the header reads, the rows do not.
    let bytes = std::fs::read(&good).unwrap();
    let truncated = file("truncated.png", &bytes[..bytes.len() * 2 / 3]);
    assert!(refused(&image(truncated.clone())).contains("not a readable PNG"));
    assert!(init_image::load(&image(truncated)).is_err());
    // Truncated JPEG: the header reads, the scan does not (a small JPEG is decoded by `check`;
    // the decoder's message, which ends in a newline, is kept on one line).
    let jpeg = std::fs::read(pil("orient1.jpg")).unwrap();
    let cut_jpeg = file("cut.jpg", &jpeg[..jpeg.len() / 2]);
    assert!(refused(&image(cut_jpeg.clone())).contains("not a readable JPEG"));
    let e = init_image::load(&image(cut_jpeg)).map(|_| ()).unwrap_err();
    assert_eq!(e.exit_code(), 2, "{e}");
    assert!(!e.to_string().contains('\n'), "{e}");

    // Decompression bombs: refused from the header, nothing allocated for the pixels.
    let bomb = file("bomb.png", &png_header(100_000, 100_000, IDAT_START));
    assert!(refused(&image(bomb)).contains("100000x100000"));
    let jbomb = file("bomb.jpg", &jpeg_header(65_000, 65_000));
    let line = refused(&image(jbomb));
    assert!(line.contains("bomb.jpg"), "{line}");
    // Within the side limit but cut short: streamed a row at a time, refused.
    let big = file("big.png", &png_header(16_000, 16_000, IDAT_START));
    assert!(refused(&image(big)).contains("not a readable PNG"));
    let zero = file("zero.png", &png_header(0, 64, IDAT_START));
    let line = refused(&image(zero));
    assert!(line.contains("zero.png"), "{line}");

    // Strength outside (0, 1], a mask without an image, a bad mask.
    for s in [0.0, -0.5, 1.01, f32::NAN] {
        let mut j = image(good.clone());
        j.strength = s;
        assert!(refused(&j).contains("strength"), "{s}");
    }
    let mut j = image(good.clone());
    j.strength = 1.0;
    assert!(init_image::check(&j).is_ok());
    let line = refused(&job(None, Some(inputs().join("mask_64x64.png")), (64, 64)));
    assert!(line.contains("needs an init image"), "{line}");
    let line = refused(&job(
        Some(good),
        Some(dir.path().join("nomask.png")),
        (64, 64),
    ));
    assert!(line.contains("nomask.png"), "{line}");
    assert!(matches!(
        init_image::check(&image(dir.path().join("x.png"))),
        Err(Error::BadFile { .. })
    ));
}

/// `load_peak_bytes` is an upper bound on what `load` allocates (measured on the heap), for a
/// plain, a resized and a masked load.
#[test]
fn load_peak_is_predicted() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.png");
    write_png(&big, 640, 400);
    let mask = inputs().join("mask_64x64.png");
    let photo = dir.path().join("photo.jpg");
    image::RgbImage::from_fn(640, 400, |x, y| {
        image::Rgb([x as u8, y as u8, (x ^ y) as u8])
    })
    .save(&photo)
    .unwrap();
    for j in [
        job(Some(photo.clone()), None, (640, 400)),
        job(Some(photo), Some(big.clone()), (512, 512)),
        job(Some(big.clone()), None, (640, 400)),
        job(Some(big.clone()), None, (512, 512)),
        job(Some(big.clone()), Some(mask.clone()), (256, 384)),
    ] {
        let (loaded, peak) = measured(|| init_image::load(&j).unwrap().unwrap());
        let predicted = init_image::load_peak_bytes(&j);
        assert!(
            peak <= predicted,
            "{}x{}: measured {peak} > predicted {predicted}",
            j.width,
            j.height
        );
        // And not wildly above: within 4× of what was measured.
        assert!(predicted < 4 * peak, "{predicted} vs {peak}");
        drop(loaded);
    }
    assert_eq!(init_image::load_peak_bytes(&job(None, None, (512, 512))), 0);
}

fn budget(bytes: u64) -> sdcap::governor::Budget {
    use sdcap::governor::{budget::margin_for, Budget, BudgetSource};
    Budget {
        limit_bytes: bytes,
        source: BudgetSource::Flag,
        margin_bytes: margin_for(bytes),
        backend_bytes: 0,
    }
}

/// The plan has an "image_encode" stage exactly when the job has an init image: the picture's
/// load and the banded VAE encode (bands chosen to fit like the decode's), on top of the tensors
/// `load` returns; a mask adds its tensors.
#[test]
fn image_encode_is_a_stage_of_the_plan() {
    use sdcap::governor::plan::{predict, Residency};
    use sdcap::kernels::scratch::TIERS;
    use sdcap::nn::vae::VaePlan;
    let _serial = serial();
    let mut j = common::job(common::tiny("tiny-sd-fp32.safetensors"));
    let models = sdcap::models::Models::load(&j).unwrap();
    let encoder = models
        .encoder
        .as_ref()
        .expect("the tiny model has an encoder");
    let huge = budget(1 << 40);
    let names = |j: &Job| -> Vec<&'static str> {
        let p = predict(&models, j, &huge, Residency::Keep, TIERS[0]);
        p.stages.iter().map(|s| s.name).collect()
    };
    assert_eq!(names(&j), ["encode", "denoise", "decode"]);
    (j.width, j.height) = (512, 512);
    j.init_image = Some(inputs().join("init_64x96.png"));
    assert_eq!(names(&j), ["encode", "image_encode", "denoise", "decode"]);
    let plan = predict(&models, &j, &huge, Residency::Keep, TIERS[0]);
    let stage = &plan.stages[1];
    assert_eq!(plan.encode_band_rows, None, "whole maps fit a huge budget");
    let image_tensor = 3 * 512 * 512 * 4;
    assert!(
        stage.activation_bytes >= encoder.peak_bytes(512, 512, &VaePlan::whole()) + image_tensor
    );
    assert!(stage.activation_bytes >= init_image::load_peak_bytes(&j));
    assert!(
        stage.weight_bytes > 0 && stage.peak_bytes >= stage.activation_bytes + stage.weight_bytes
    );
    j.mask = Some(inputs().join("mask_64x64.png"));
    let masked = predict(&models, &j, &huge, Residency::Keep, TIERS[0]);
    assert_eq!(
        masked.stages[1].activation_bytes,
        stage.activation_bytes + 4 * 512 * 512 * 4,
        "mask and masked image"
    );
    // A budget too small for any encode: the 1-row floor is planned, its peak over the budget.
    j.mask = None;
    let small = budget(64 << 20);
    let p = predict(&models, &j, &small, Residency::Keep, TIERS[0]);
    assert_eq!(p.encode_band_rows, Some(1));
    assert!(p.stages[1].peak_bytes > small.usable_bytes());
    assert!(!p.fits());
}

/// SD1.5's layout (`/tmp/sd15.safetensors`, a random-weight file with the real shapes; skipped
/// when absent): a 512² img2img plans its encode within 512 MiB; a 1024² init image on a 512 MiB
/// cap is planned (the encode stage is predicted from the shapes, with 1-row bands) and refused
/// with numbers, exit 3, as txt2img at 1024² is.
#[test]
fn sd15_image_encode_is_planned() {
    use sdcap::governor::plan::{predict, Residency};
    use sdcap::kernels::scratch::SMALLEST;
    let _serial = serial();
    let model = Path::new("/tmp/sd15.safetensors");
    if !model.exists() {
        eprintln!("skipped: {} is absent", model.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut j = Job::new(model.to_path_buf(), "x");
    let models = sdcap::models::Models::load(&j).unwrap();
    let encoder = models.encoder.as_ref().unwrap();
    let cap = budget(512 << 20);
    for side in [512u32, 1024] {
        let picture = dir.path().join(format!("{side}.png"));
        write_png(&picture, side, side);
        (j.width, j.height, j.init_image, j.ram_cap) = (side, side, Some(picture), Some(512 << 20));
        let p = predict(&models, &j, &cap, Residency::Stream, SMALLEST);
        let stage = p.stages.iter().find(|s| s.name == "image_encode").unwrap();
        let s = side as usize;
        let one_row = encoder.peak_bytes(s, s, &sdcap::nn::vae::VaePlan::banded(1));
        eprintln!(
            "{side}²: image_encode {} MiB (activations {} MiB, weights {} MiB), bands {:?}; 1-row encode {} MiB",
            stage.peak_bytes >> 20,
            stage.activation_bytes >> 20,
            stage.weight_bytes >> 20,
            p.encode_band_rows,
            one_row >> 20
        );
        // A 128-channel full-resolution resnet holds its input and output (2 × 4·128·side²).
        assert!(one_row >= 2 * 4 * 128 * (s * s) as u64);
        if side == 512 {
            assert!(
                stage.peak_bytes <= cap.usable_bytes(),
                "512² encode fits 512 MiB"
            );
        } else {
            assert_eq!(p.encode_band_rows, Some(1));
            assert!(stage.peak_bytes > cap.usable_bytes());
            let err = sdcap::governor::plan(&models, &j, &cap).unwrap_err();
            assert_eq!(err.exit_code(), 3, "{err}");
        }
    }
}
