//! Shared helpers for the integration tests: fixture paths and reading reference tensors.
#![allow(dead_code)]

pub mod counting;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use safetensors::{Dtype, SafeTensors};
use sdcap::job::{Job, RngKind, SamplerKind, ScheduleKind};
use sdcap::weights::{TensorStore, Weights};
use sdcap::Tensor;

/// The test data: `$SDCAP_FIXTURES` if set (a full fixtures folder), else `tests/data` of the crate
/// as the tests read it, made once per process under `CARGO_TARGET_TMPDIR` (see [`materialize`]).
pub fn fixtures() -> PathBuf {
    if let Some(dir) = std::env::var_os("SDCAP_FIXTURES") {
        return PathBuf::from(dir);
    }
    carried()
}

/// `tests/data` as the tests read it (whatever `$SDCAP_FIXTURES` says): made once per process under
/// `CARGO_TARGET_TMPDIR`, every `X.delta` rebuilt as `X` (see [`materialize`]).
pub fn carried() -> PathBuf {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    DATA.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-data");
        materialize(&data_dir(), &out);
        out
    })
    .clone()
}

/// `tests/data` in the crate: what the repository carries (see its README.md and MANIFEST).
pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// A helper program the tests run (`tests/data/tools/NAME`), carried whatever `$SDCAP_FIXTURES` says.
pub fn tool(name: &str) -> PathBuf {
    data_dir().join("tools").join(name)
}

/// Makes `out` a copy of the data folder `data` in which every `X.delta` is rebuilt as `X`: each file
/// is (re)written only when missing or different, through a temporary name and a rename (so that
/// test processes running at once never see half a file), and files of `out` that `data` no longer
/// has are removed. A rebuilt file must have the size and CRC-32 its delta records.
pub fn materialize(data: &Path, out: &Path) {
    let mut wanted = std::collections::HashSet::new();
    for file in files_below(data) {
        let rel = file.strip_prefix(data).unwrap();
        let name = rel.to_str().expect("data file names are UTF-8");
        let (target, bytes) = match name.strip_suffix(".delta") {
            Some(stem) => (out.join(stem), None),
            None => (out.join(rel), Some(read(&file))),
        };
        wanted.insert(target.clone());
        let current = std::fs::read(&target).ok();
        let bytes = match bytes {
            Some(bytes) if current.as_ref() == Some(&bytes) => continue,
            Some(bytes) => bytes,
            None => {
                let delta = Delta::read(&file);
                if current.is_some_and(|c| delta.matches(&c)) {
                    continue;
                }
                delta.rebuild(&file)
            }
        };
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        let tmp = target.with_file_name(format!(
            ".{}.{}.tmp",
            target.file_name().unwrap().to_string_lossy(),
            std::process::id()
        ));
        std::fs::write(&tmp, &bytes).unwrap_or_else(|e| panic!("{}: {e}", tmp.display()));
        let mode = std::fs::metadata(&file).unwrap().permissions();
        std::fs::set_permissions(&tmp, mode).unwrap();
        std::fs::rename(&tmp, &target).unwrap();
    }
    for file in files_below(out) {
        let hidden = file.file_name().unwrap().to_string_lossy().starts_with('.');
        if !hidden && !wanted.contains(&file) {
            let _ = std::fs::remove_file(&file);
        }
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every file below `dir` (none if it does not exist).
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// A `.delta` file of `tests/data` (written by `tests/data/refresh.py`): 8-byte little-endian header
/// length, a JSON header, then literal bytes. The file it stands for is the header's segments in
/// order, each a range of the literal bytes, a byte pattern repeated (the NaN of a dropped row), or a
/// range of a base file of the crate (which may itself be carried as `BASE.delta`).
pub struct Delta {
    size: u64,
    crc32: u32,
    segments: Vec<Segment>,
    literal: Vec<u8>,
}

enum Segment {
    Literal {
        at: usize,
        len: usize,
    },
    Fill {
        pattern: Vec<u8>,
        len: usize,
    },
    Base {
        path: PathBuf,
        at: usize,
        len: usize,
    },
}

impl Delta {
    pub fn read(path: &Path) -> Delta {
        let bytes = read(path);
        let bad = |what: &str| -> ! { panic!("{}: {what}", path.display()) };
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value =
            serde_json::from_slice(&bytes[8..8 + n]).unwrap_or_else(|e| bad(&e.to_string()));
        if header["format"] != "sdcap test-data delta 1" {
            bad("not a delta of format 1");
        }
        let num = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| bad("bad number")) as usize;
        let segments = header["segments"]
            .as_array()
            .unwrap_or_else(|| bad("no segments"))
            .iter()
            .map(|s| match (s.get("literal"), s.get("fill")) {
                (Some(l), _) => Segment::Literal {
                    at: num(&l[0]),
                    len: num(&l[1]),
                },
                (None, Some(hex)) => {
                    let hex = hex.as_str().unwrap_or_else(|| bad("bad fill"));
                    let pattern: Vec<u8> = (0..hex.len() / 2)
                        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
                        .collect::<Result<_, _>>()
                        .unwrap_or_else(|_| bad("bad fill"));
                    if pattern.is_empty() {
                        bad("empty fill");
                    }
                    Segment::Fill {
                        pattern,
                        len: num(&s["len"]),
                    }
                }
                (None, None) => Segment::Base {
                    path: Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join(s["base"].as_str().unwrap_or_else(|| bad("bad base"))),
                    at: num(&s["at"]),
                    len: num(&s["len"]),
                },
            })
            .collect();
        Delta {
            size: num(&header["size"]) as u64,
            crc32: num(&header["crc32"]) as u32,
            segments,
            literal: bytes[8 + n..].to_vec(),
        }
    }

    /// Whether `bytes` has the recorded size and CRC-32.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        bytes.len() as u64 == self.size && crc32(bytes) == self.crc32
    }

    /// The file the delta stands for; panics unless it has the recorded size and CRC-32.
    pub fn rebuild(&self, path: &Path) -> Vec<u8> {
        let mut bases: HashMap<&Path, Vec<u8>> = HashMap::new();
        let mut out = Vec::with_capacity(self.size as usize);
        for segment in &self.segments {
            match segment {
                Segment::Literal { at, len } => out.extend_from_slice(&self.literal[*at..at + len]),
                Segment::Fill { pattern, len } => {
                    out.extend(pattern.iter().cycle().take(*len));
                }
                Segment::Base { path, at, len } => {
                    let base = bases.entry(path).or_insert_with(|| read_base(path));
                    out.extend_from_slice(&base[*at..at + len]);
                }
            }
        }
        assert!(
            self.matches(&out),
            "{}: rebuilt {} bytes that differ from what the delta records (was a base file changed? \
             run tests/data/refresh.py)",
            path.display(),
            out.len()
        );
        out
    }
}

/// A delta's base file: the file, or, where the crate carries it as `PATH.delta` (a file of
/// `tests/data` that is itself a delta), its rebuild.
fn read_base(path: &Path) -> Vec<u8> {
    let mut delta = path.as_os_str().to_owned();
    delta.push(".delta");
    let delta = PathBuf::from(delta);
    if !path.is_file() && delta.is_file() {
        Delta::read(&delta).rebuild(&delta)
    } else {
        read(path)
    }
}

/// CRC-32 (IEEE 802.3, as Python's `zlib.crc32`).
pub fn crc32(bytes: &[u8]) -> u32 {
    static TABLE: OnceLock<[u32; 256]> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        std::array::from_fn(|i| {
            (0..8).fold(i as u32, |c, _| {
                if c & 1 == 1 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                }
            })
        })
    });
    !bytes.iter().fold(!0u32, |c, &b| {
        table[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8)
    })
}

/// Sets up threads as the CLI does (`start_pool`): the global rayon pool's workers and the calling
/// test thread flush denormals. Called first by every test that compares numbers.
pub fn compute_threads() {
    static POOL: std::sync::Once = std::sync::Once::new();
    POOL.call_once(|| {
        // Fails only if rayon's default pool was started first; the assert below then says so.
        let _ = sdcap::kernels::compute_pool(0).build_global();
    });
    sdcap::kernels::flush_denormals();
    let workers = rayon::broadcast(|_| sdcap::kernels::denormals_flushed());
    assert!(
        workers.iter().all(|&f| f),
        "the global pool was started without compute_threads()"
    );
}

pub fn tiny(rel: &str) -> PathBuf {
    fixtures().join("tiny-sd").join(rel)
}

/// Every float32 / int64 tensor of a reference file, as f32.
pub fn read_tensors(path: &std::path::Path) -> HashMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("reference file parses");
    st.tensors()
        .into_iter()
        .filter_map(|(name, view)| {
            let data: Vec<f32> = match view.dtype() {
                Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                Dtype::I64 => view
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                    .collect(),
                Dtype::U8 => view.data().iter().map(|&b| b as f32).collect(),
                _ => return None,
            };
            Some((name, Tensor::new(view.shape().to_vec(), data)))
        })
        .collect()
}

pub fn tiny_weights(prefix: &str) -> Weights {
    let store = TensorStore::open(&tiny("tiny-sd-fp32.safetensors")).expect("tiny model opens");
    Weights::new(Arc::new(store), prefix)
}

/// Asserts max|got - want| ≤ rel · max|want| (the 1e-4 relative criterion), and that `got`
/// is finite (`max_abs_diff` skips NaN; a NaN may come from a token row `tests/data` does not carry,
/// see its README).
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, rel: f32) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    assert!(
        got.data.iter().all(|v| v.is_finite()),
        "{what}: non-finite values (a prompt with a token whose row tests/data drops? see tests/data/README.md)"
    );
    let err = got.max_abs_diff(want);
    let scale = want.max_abs();
    assert!(
        err <= rel * scale,
        "{what}: max abs error {err:e} > {rel:e} × {scale}"
    );
    eprintln!("{what}: max abs error {err:e} (≤ {rel:e} × {scale})");
}

/// A fixture manifest. Python's json writes `-Infinity`/`Infinity`/`NaN`, which JSON (and
/// serde_json) does not have; they only appear in scheduler configs we do not read, so they become null.
pub fn read_manifest(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let text = text
        .replace("-Infinity", "null")
        .replace("Infinity", "null")
        .replace("NaN", "null");
    serde_json::from_str(&text).expect("manifest parses")
}

/// The reference job of the fixtures: "a photo of a cat", euler, seed 42, 64×64, 4 steps, cfg 7.5.
pub fn job(model: PathBuf) -> Job {
    Job {
        model,
        vae: None,
        prompt: "a photo of a cat".into(),
        negative: None,
        width: 64,
        height: 64,
        steps: 4,
        cfg_scale: 7.5,
        sampler: SamplerKind::Euler,
        scheduler: ScheduleKind::Discrete,
        seed: 42,
        clip_skip: 1,
        rng: RngKind::Cpu,
        ram_cap: None,
        prediction: None,
        ..Job::new(PathBuf::new(), "")
    }
}

/// Final latents of a whole txt2img run against diffusers: 1e-3 max abs (f32 reordering over a few
/// steps lands near 1e-5).
pub const LATENT_TOL: f32 = 1e-3;

/// A whole run against a diffusers golden: final latent within `LATENT_TOL`, and the 8-bit image
/// within 1 level on ≥ 99.9% of values (a value at a rounding boundary may round the other way).
pub fn assert_run_matches(
    what: &str,
    got: &sdcap::pipeline::Generated,
    refs: &HashMap<String, Tensor>,
) {
    let want = &refs["final_latents"];
    assert_eq!(got.latent.shape, want.shape, "{what}: latent shape");
    let err = got.latent.max_abs_diff(want);
    assert!(
        err <= LATENT_TOL,
        "{what}: final latent max abs error {err:e}"
    );
    let off = assert_pixels_match(what, &got.image.pixels, &refs["image_uint8"].data);
    eprintln!("{what}: latent error {err:e}, {off} pixel values off by > 1");
}

/// An 8-bit image against diffusers' `image_uint8`: within 1 level on ≥ 99.9% of values (a value
/// at a rounding boundary may round the other way after f32 reordering). Returns how many differ by
/// more.
pub fn assert_pixels_match(what: &str, got: &[u8], want: &[f32]) -> usize {
    assert_eq!(got.len(), want.len(), "{what}: image size");
    let off = got
        .iter()
        .zip(want)
        .filter(|(a, b)| (**a as f32 - **b).abs() > 1.0)
        .count();
    assert!(
        off as f64 <= 0.001 * want.len() as f64,
        "{what}: {off} of {} values differ by more than 1",
        want.len()
    );
    off
}

/// Step noise recorded by diffusers, handed out in order (and checked to be used up).
pub struct Recorded(pub std::collections::VecDeque<Vec<f32>>);

impl sdcap::sampling::NoiseSource for Recorded {
    fn noise(&mut self, len: usize) -> Vec<f32> {
        let n = self
            .0
            .pop_front()
            .expect("sampler drew more noise than diffusers did");
        assert_eq!(n.len(), len);
        n
    }
}
