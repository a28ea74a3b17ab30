//! img2img / inpaint input: the init image and the mask, read as diffusers'
//! `VaeImageProcessor.preprocess` reads PIL images.
//!
//! PNG and JPEG (the `image` crate, only those two decoders), EXIF orientation honoured (JPEG APP1
//! and PNG `eXIf`), every colour type converted to 8-bit RGB (alpha dropped, as PIL's
//! `convert("RGB")` does; 16-bit samples rounded to 8 bits). Resized, when the size differs, with
//! PIL's Lanczos resampling step for step (`resize_u8`: PIL's coefficients, its 22-bit fixed point
//! and its rounding, horizontal pass first), as diffusers' `VaeImageProcessor.resize` calls
//! `Image.resize(..., LANCZOS)`. The image becomes `u8 / 255 · 2 − 1` in f32; the mask is
//! converted to grey with PIL's `convert("L")` formula, resized the same way, `/ 255`, and
//! binarised at 0.5 (`mask_processor`: `do_binarize`, `do_convert_grayscale`, Lanczos).
//!
//! `check` reads headers, streams a PNG's rows through the decoder one at a time and decodes a
//! JPEG of at most 64 MiB of pixels, so a truncated file is refused before any model is loaded;
//! `load` decodes. `load_peak_bytes` is what
//! `load` allocates, counted by the governor's plan.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

use crate::error::{Error, Result};
use crate::job::Job;
use crate::tensor::Tensor;

/// Largest side accepted for an input picture, before anything is allocated for it: a declared
/// size above this is a decompression bomb or a mistake (the largest phone and camera pictures are
/// under 12k a side). What a picture below it costs is counted by the plan.
pub const MAX_INPUT_SIDE: u32 = 16384;

/// The smallest and largest sides `default_size` gives (sdcap's smallest and largest image).
const MIN_DEFAULT_SIDE: u32 = crate::job::MIN_SIDE;
const MAX_DEFAULT_SIDE: u32 = crate::job::MAX_SIDE;

/// The init image (and mask) of an img2img or inpaint job, ready for the VAE encoder.
#[derive(Clone, Debug)]
pub struct InitImage {
    /// [1, 3, H, W] in [-1, 1]: `u8 / 255 · 2 − 1` of the (resized) RGB picture.
    pub image: Tensor,
    /// [1, 1, H, W], 1 = repaint, 0 = keep (binarised as diffusers' `mask_processor`).
    pub mask: Option<Tensor>,
    /// The picture's size (width, height, EXIF orientation applied) when it was resized to the
    /// job's size.
    pub resized_from: Option<(u32, u32)>,
}

impl InitImage {
    /// A one-line notice when the picture was resized, e.g. for the CLI's log.
    pub fn notice(&self) -> Option<String> {
        let (w, h) = self.resized_from?;
        let (_, _, th, tw) = self.image.nchw();
        Some(format!("init image resized from {w}x{h} to {tw}x{th}"))
    }
}

/// What a picture file declares in its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub format: ImageFormat,
    /// As shown: EXIF orientation applied (sides swapped for 90° turns).
    pub width: u32,
    pub height: u32,
    /// Bytes the decoder allocates for the pixels as stored.
    pub decoded_bytes: u64,
}

/// Cheap checks for `Job::validate`: the img2img settings (`img2img::check`: strength, a mask
/// only with an image), then each file a readable PNG or JPEG of a sane declared size (a PNG also
/// decodes to its end).
pub fn check(job: &Job) -> Result<()> {
    crate::img2img::check(job)?;
    for path in job.init_image.iter().chain(&job.mask) {
        let header = read_header(path)?;
        match header.format {
            ImageFormat::Png => verify_png(path)?,
            // A JPEG decodes only whole: here when that is small (below every plan's peak, and
            // less than `load` itself takes), else by `load`, under the plan.
            _ if header.decoded_bytes <= CHECK_DECODE_BYTES => {
                decode(path, Channels::Rgb)?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// The largest JPEG (decoded bytes) `check` decodes whole to find a corrupt file before the
/// model loads: 64 MiB, a 21-megapixel photo.
const CHECK_DECODE_BYTES: u64 = 64 << 20;

/// An `image` or `png` error as one line (some end with a newline or hold several lines).
fn one_line(e: impl std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The size a job takes from its init image when the user gave no width and height: the picture's
/// own (as shown), each side rounded down to a multiple of 8 and at least 64 (diffusers rounds
/// down to the VAE's multiple; sdcap's smallest side is 64); a picture larger than sdcap's largest
/// side (2048) is first scaled down to it, keeping its aspect. `load` resizes to it when it
/// differs (and `InitImage::notice` says so).
pub fn default_size(path: &Path) -> Result<(u32, u32)> {
    let h = read_header(path)?;
    let scale = (MAX_DEFAULT_SIDE as f64 / h.width.max(h.height) as f64).min(1.0);
    let side = |v: u32| {
        let scaled = (v as f64 * scale).floor() as u32;
        (scaled / 8 * 8).clamp(MIN_DEFAULT_SIDE, MAX_DEFAULT_SIDE)
    };
    Ok((side(h.width), side(h.height)))
}

/// Reads and checks a picture's header: a regular file (FIFOs, devices and directories refused
/// without opening them), PNG or JPEG, sides in 1..=`MAX_INPUT_SIDE`.
pub fn read_header(path: &Path) -> Result<Header> {
    let (format, mut decoder) = open(path)?;
    header_of(path, format, &mut decoder).map(|(h, _)| h)
}

/// The header and the EXIF orientation (`NoTransforms` when the file has none or an unreadable
/// one: the picture is then shown as stored, as viewers do).
fn header_of(
    path: &Path,
    format: ImageFormat,
    decoder: &mut impl ImageDecoder,
) -> Result<(Header, Orientation)> {
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::bad_file(
            path,
            format!("the image is {w}x{h} pixels"),
        ));
    }
    if w > MAX_INPUT_SIDE || h > MAX_INPUT_SIDE {
        return Err(Error::bad_file(
            path,
            format!("the image declares {w}x{h} pixels, more than {MAX_INPUT_SIDE} a side"),
        ));
    }
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let turned = matches!(
        orientation,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    );
    let (width, height) = if turned { (h, w) } else { (w, h) };
    let header = Header {
        format,
        width,
        height,
        decoded_bytes: decoder.total_bytes(),
    };
    Ok((header, orientation))
}

/// Opens a picture file for decoding (the header is read, no pixels).
fn open(path: &Path) -> Result<(ImageFormat, impl ImageDecoder)> {
    let bad = |msg: String| Error::bad_file(path, msg);
    // Checked before opening: opening a FIFO for reading would wait for a writer.
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => return Err(bad("not a regular file".into())),
        Err(e) => return Err(bad(format!("cannot read the image: {}", one_line(e)))),
    }
    let file =
        File::open(path).map_err(|e| bad(format!("cannot read the image: {}", one_line(e))))?;
    let mut reader = ImageReader::new(BufReader::new(file))
        .with_guessed_format()
        .map_err(|e| bad(format!("cannot read the image: {}", one_line(e))))?;
    let format = match reader.format() {
        Some(f @ (ImageFormat::Png | ImageFormat::Jpeg)) => f,
        _ => return Err(bad("not a PNG or JPEG image".into())),
    };
    // The size is checked from the header (`header_of`) before any pixel is decoded, and what a
    // picture within it costs is the plan's to count: the decoders' own default cap (512 MiB)
    // would refuse a large 16-bit picture that the plan can fit.
    reader.no_limits();
    let decoder = reader.into_decoder().map_err(|e| {
        bad(format!(
            "not a readable {} image: {}",
            format_name(format),
            one_line(e)
        ))
    })?;
    Ok((format, decoder))
}

fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Png => "PNG",
        _ => "JPEG",
    }
}

/// Decodes a PNG's rows one at a time to its end (one row of memory): a truncated or corrupt
/// file is refused by `check`, before any model is loaded.
fn verify_png(path: &Path) -> Result<()> {
    let bad = |e: png::DecodingError| {
        Error::bad_file(path, format!("not a readable PNG image: {}", one_line(e)))
    };
    let file = File::open(path)
        .map_err(|e| Error::bad_file(path, format!("cannot read the image: {e}")))?;
    let mut reader = png::Decoder::new(BufReader::new(file))
        .read_info()
        .map_err(bad)?;
    while reader.next_row().map_err(bad)?.is_some() {}
    Ok(())
}

/// Bytes `load` allocates at its peak for `job`'s picture(s), from their headers: the decoded
/// pixels, their RGB (or grey) copy and its turned copy, PIL's two resize passes, and the f32
/// tensors returned (which stay while the encoder runs). The mask is read after the image, whose
/// tensor it then sees alive. 0 without an init image; an unreadable file (refused by `check`)
/// counts as nothing.
pub fn load_peak_bytes(job: &Job) -> u64 {
    let Some(image) = &job.init_image else {
        return 0;
    };
    let (w, h) = (job.width as u64, job.height as u64);
    let pixels = |channels: u64| w.saturating_mul(h).saturating_mul(channels);
    let one = |path: &Path, channels: u64| -> u64 {
        let Ok(header) = read_header(path) else {
            return 0;
        };
        let stored = header.width as u64 * header.height as u64 * channels;
        // Horizontal pass first: target width × source height.
        let pass = w.saturating_mul(header.height.max(header.width) as u64) * channels;
        header
            .decoded_bytes
            .saturating_add(stored.saturating_mul(2))
            .saturating_add(pass)
            .saturating_add(pixels(channels))
            .saturating_add(pixels(channels).saturating_mul(4))
    };
    let image_tensor = pixels(3).saturating_mul(4);
    let image_peak = one(image, 3);
    match &job.mask {
        Some(mask) => image_peak.max(image_tensor.saturating_add(one(mask, 1))),
        None => image_peak,
    }
}

/// Reads `job.init_image` (and `job.mask`) resized to `job.width × job.height`; `None` without
/// an init image.
pub fn load(job: &Job) -> Result<Option<InitImage>> {
    let Some(path) = &job.init_image else {
        return Ok(None);
    };
    let size = (job.width, job.height);
    let (rgb, original) = decode(path, Channels::Rgb)?;
    let resized_from = (original != size).then_some(original);
    let rgb = resize_u8(&rgb, 3, original, size);
    let mut values = Vec::with_capacity(rgb.len());
    values.extend(planes(&rgb, 3).map(|v| 2.0 * (v as f32 / 255.0) - 1.0));
    let image = Tensor::new(vec![1, 3, size.1 as usize, size.0 as usize], values);
    drop(rgb);
    let mask = match &job.mask {
        Some(path) => {
            let (grey, original) = decode(path, Channels::Grey)?;
            let grey = resize_u8(&grey, 1, original, size);
            let values = grey
                .iter()
                .map(|&v| if v as f32 / 255.0 < 0.5 { 0.0 } else { 1.0 })
                .collect();
            Some(Tensor::new(
                vec![1, 1, size.1 as usize, size.0 as usize],
                values,
            ))
        }
        None => None,
    };
    Ok(Some(InitImage {
        image,
        mask,
        resized_from,
    }))
}

/// The samples `decode` gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channels {
    /// 8-bit RGB, interleaved.
    Rgb,
    /// 8-bit grey by PIL's `convert("L")`.
    Grey,
}

/// Decodes `path` as shown (EXIF orientation applied) into interleaved 8-bit samples; returns
/// them with (width, height).
pub fn decode(path: &Path, channels: Channels) -> Result<(Vec<u8>, (u32, u32))> {
    let (format, mut decoder) = open(path)?;
    let (_, orientation) = header_of(path, format, &mut decoder)?;
    let picture = DynamicImage::from_decoder(decoder).map_err(|e| {
        Error::bad_file(
            path,
            format!(
                "not a readable {} image: {}",
                format_name(format),
                one_line(e)
            ),
        )
    })?;
    // Alpha dropped and 16-bit samples rounded to 8 bits (`image`'s conversions), before turning:
    // the turn then moves 3 bytes a pixel.
    let mut picture = DynamicImage::ImageRgb8(picture.into_rgb8());
    picture.apply_orientation(orientation);
    let rgb = picture.into_rgb8();
    let size = rgb.dimensions();
    let samples = match channels {
        Channels::Rgb => rgb.into_raw(),
        Channels::Grey => rgb.pixels().map(|p| pil_luma(p.0)).collect(),
    };
    Ok((samples, size))
}

/// PIL's RGB → "L": ITU-R 601-2 luma in 16-bit fixed point, rounded (`rgb2l` in `Convert.c`).
fn pil_luma([r, g, b]: [u8; 3]) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

/// Interleaved samples [h][w][c] → planar order [c][h][w].
fn planes(samples: &[u8], channels: usize) -> impl Iterator<Item = u8> + '_ {
    (0..channels).flat_map(move |c| samples.iter().skip(c).step_by(channels).copied())
}

/// PIL's Lanczos support (a = 3).
const LANCZOS_SUPPORT: f64 = 3.0;
/// PIL's fixed point for 8-bit resampling (`PRECISION_BITS` in `Resample.c`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn lanczos(x: f64) -> f64 {
    if (-LANCZOS_SUPPORT..LANCZOS_SUPPORT).contains(&x) {
        sinc(x) * sinc(x / LANCZOS_SUPPORT)
    } else {
        0.0
    }
}

/// One output sample's taps: the first input index and the fixed-point weights.
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for resizing `input` samples to `output`.
fn taps(input: usize, output: usize) -> Vec<Taps> {
    let scale = input as f64 / output as f64;
    let filter_scale = scale.max(1.0);
    let support = LANCZOS_SUPPORT * filter_scale;
    (0..output)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's `(int)` truncates toward zero, then the bounds are clamped.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let mut weights: Vec<f64> = (xmin..xmax)
                .map(|x| lanczos((x as f64 - center + 0.5) / filter_scale))
                .collect();
            let total: f64 = weights.iter().sum();
            if total != 0.0 {
                weights.iter_mut().for_each(|w| *w /= total);
            }
            let one = (1u32 << PRECISION_BITS) as f64;
            let weights = weights
                .iter()
                .map(|&w| {
                    if w < 0.0 {
                        (-0.5 + w * one) as i32
                    } else {
                        (0.5 + w * one) as i32
                    }
                })
                .collect();
            Taps {
                first: xmin,
                weights,
            }
        })
        .collect()
}

/// PIL's `clip8`: the fixed-point sum, rounded by the half added before, to 0..=255.
fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes interleaved 8-bit `samples` (`channels` per pixel) from `from` to `to` (width,
/// height) as PIL's `Image.resize(to, LANCZOS)`: a horizontal pass when the width changes, then
/// a vertical pass when the height does, each rounding to 8 bits.
pub fn resize_u8(samples: &[u8], channels: usize, from: (u32, u32), to: (u32, u32)) -> Vec<u8> {
    let (w, h) = (from.0 as usize, from.1 as usize);
    let (nw, nh) = (to.0 as usize, to.1 as usize);
    assert_eq!(samples.len(), w * h * channels, "samples size");
    let half = 1i32 << (PRECISION_BITS - 1);
    let horizontal = if nw != w {
        let taps = taps(w, nw);
        let mut out = vec![0u8; nw * h * channels];
        for (src, dst) in samples
            .chunks(w * channels)
            .zip(out.chunks_mut(nw * channels))
        {
            for (t, px) in taps.iter().zip(dst.chunks_mut(channels)) {
                for (c, v) in px.iter_mut().enumerate() {
                    let sum = t.weights.iter().enumerate().fold(half, |s, (i, &k)| {
                        s + src[(t.first + i) * channels + c] as i32 * k
                    });
                    *v = clip8(sum);
                }
            }
        }
        std::borrow::Cow::Owned(out)
    } else {
        std::borrow::Cow::Borrowed(samples)
    };
    if nh == h {
        return horizontal.into_owned();
    }
    let row = nw * channels;
    let taps = taps(h, nh);
    let mut out = vec![0u8; nh * row];
    for (t, dst) in taps.iter().zip(out.chunks_mut(row)) {
        for (i, v) in dst.iter_mut().enumerate() {
            let sum = t.weights.iter().enumerate().fold(half, |s, (j, &k)| {
                s + horizontal[(t.first + j) * row + i] as i32 * k
            });
            *v = clip8(sum);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_a_copy_and_weights_sum_to_one() {
        let samples: Vec<u8> = (0..5 * 7 * 3).map(|i| (i * 37 % 256) as u8).collect();
        assert_eq!(resize_u8(&samples, 3, (5, 7), (5, 7)), samples);
        for (input, output) in [(64, 40), (64, 128), (96, 8), (7, 1000)] {
            for t in taps(input, output) {
                let sum: i64 = t.weights.iter().map(|&k| k as i64).sum();
                // Rounding each weight moves the sum by at most half a unit per tap.
                assert!((sum - (1 << PRECISION_BITS)).abs() <= t.weights.len() as i64);
                assert!(t.first + t.weights.len() <= input);
            }
        }
        // A flat picture stays flat.
        let flat = vec![77u8; 9 * 11];
        assert!(resize_u8(&flat, 1, (9, 11), (24, 5))
            .iter()
            .all(|&v| v == 77));
    }
}
