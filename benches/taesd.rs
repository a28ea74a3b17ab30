//! TAESD decode vs the VAE decode (issue 16), each in its own process for its peak RSS, and a
//! generator for a random-weight full-size TAESD (the architecture is fixed: 64 channels,
//! 1,222,531 decoder + 1,222,532 encoder parameters; only the weights are random).
//!
//! `benches/taesd.sh` drives this binary; by hand:
//!
//! ```text
//! cargo bench --bench taesd -- make DIR                      # DIR/taesd_{decoder,encoder}.safetensors, F32
//! cargo bench --bench taesd -- decode vae|taesd MODEL TAESD SIZE [REPEATS]
//! ```

#[path = "common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use common::contention_note;
use sdcap::governor::memory;
use sdcap::nn::taesd::Taesd;
use sdcap::nn::vae::{Decoder, VaePlan};
use sdcap::sampling::rng::TorchRng;
use sdcap::tensor::Tensor;
use sdcap::weights::{detect_family, TensorStore, Weights};

/// One tensor to write: name, shape, values.
type Named = (String, Vec<usize>, Vec<f32>);

/// taesd.py's layout with random weights: `N(0, gain²/fan_in)` (gain √2 for a Block's first two
/// convs, 0.5 for its last, 1 otherwise), biases `N(0, 0.05²)`: the tiny-taesd fixture's rule,
/// which keeps the decoded image from being nearly constant (the speed does not depend on it).
fn random_half(encoder: bool, rng: &mut TorchRng) -> Vec<Named> {
    let mut g = Gen {
        rng,
        out: Vec::new(),
    };
    if encoder {
        // 0 conv(3,64); 1 Block; then three times: conv stride 2 (no bias), Block ×3; conv(64,4).
        g.conv("0", 64, 3, true, 1.0);
        g.block(1);
        let mut i = 2;
        for _ in 0..3 {
            g.conv(&i.to_string(), 64, 64, false, 1.0);
            (1..=3).for_each(|b| g.block(i + b));
            i += 4;
        }
        g.conv(&i.to_string(), 4, 64, true, 1.0);
    } else {
        // 0 Clamp; 1 conv(4,64); 2 ReLU; 3-5 Blocks; then (Upsample, conv no bias, Blocks) for
        // 3, 3, 1 blocks; conv(64,3).
        g.conv("1", 64, 4, true, 1.0);
        (3..6).for_each(|b| g.block(b));
        let mut i = 6;
        for blocks in [3, 3, 1] {
            g.conv(&(i + 1).to_string(), 64, 64, false, 1.0);
            (0..blocks).for_each(|b| g.block(i + 2 + b));
            i += 2 + blocks;
        }
        g.conv(&i.to_string(), 3, 64, true, 1.0);
    }
    g.out
}

/// Draws tensors in state-dict order.
struct Gen<'a> {
    rng: &'a mut TorchRng,
    out: Vec<Named>,
}

impl Gen<'_> {
    fn conv(&mut self, name: &str, co: usize, ci: usize, bias: bool, gain: f32) {
        let scale = gain / ((ci * 9) as f32).sqrt();
        let w = self.rng.randn(&[co, ci, 3, 3]);
        let w = w.iter().map(|v| v * scale).collect();
        self.out
            .push((format!("{name}.weight"), vec![co, ci, 3, 3], w));
        if bias {
            let b = self.rng.randn(&[co]).iter().map(|v| v * 0.05).collect();
            self.out.push((format!("{name}.bias"), vec![co], b));
        }
    }

    fn block(&mut self, i: usize) {
        for (k, gain) in [(0, 2f32.sqrt()), (2, 2f32.sqrt()), (4, 0.5)] {
            self.conv(&format!("{i}.conv.{k}"), 64, 64, true, gain);
        }
    }
}

fn write(path: &Path, tensors: &[Named]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                    .expect("view");
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write TAESD");
}

fn make(dir: &Path) {
    std::fs::create_dir_all(dir).expect("create the folder");
    let mut rng = TorchRng::new(6);
    for (encoder, name) in [(false, "taesd_decoder"), (true, "taesd_encoder")] {
        let tensors = random_half(encoder, &mut rng);
        let params: usize = tensors.iter().map(|t| t.2.len()).sum();
        let path = dir.join(format!("{name}.safetensors"));
        write(&path, &tensors);
        println!("{}: {params} parameters", path.display());
    }
}

/// One decode of a random latent for a SIZE² image, `repeats` times: the best time and the
/// process's peak RSS.
fn decode(which: &str, model: &Path, taesd: &Path, size: usize, repeats: usize) {
    let note = contention_note();
    let lat = size / 8;
    let z = Tensor::new(
        vec![1, 4, lat, lat],
        TorchRng::new(1).randn(&[1, 4, lat, lat]),
    );
    let run: Box<dyn Fn() -> Tensor> = match which {
        "vae" => {
            let store = TensorStore::open(model).expect("open the model");
            let spec = detect_family(&store).expect("family").spec();
            let store = Arc::new(store);
            let prefix = spec.vae_prefix.trim_end_matches('.');
            let decoder = Decoder::new(&Weights::new(store, prefix)).expect("VAE decoder");
            let scale = spec.vae_scaling_factor;
            let z = Tensor::new(z.shape.clone(), z.data.iter().map(|v| v / scale).collect());
            Box::new(move || decoder.forward_planned(&z, &VaePlan::default()))
        }
        "taesd" => {
            let t = Taesd::open(taesd).expect("open TAESD");
            Box::new(move || t.decode(&z).expect("decode"))
        }
        _ => panic!("decode vae|taesd"),
    };
    let mut best = f64::MAX;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        std::hint::black_box(run());
        best = best.min(t.elapsed().as_secs_f64());
        memory::release_free_memory();
    }
    let peak = memory::peak_rss_bytes().unwrap_or(0) as f64 / (1 << 20) as f64;
    println!(
        "{which:>5} decode {size}²: best {best:.2} s of {repeats} | peak RSS {peak:.0} MiB | start: {note}; end: {}",
        contention_note()
    );
}

fn main() {
    let denormals = common::start_compute_threads();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["make", dir] => make(Path::new(dir)),
        ["decode", which, model, taesd, size, rest @ ..] => {
            println!("({denormals})");
            let repeats = rest.first().map_or(2, |r| r.parse().expect("repeats"));
            decode(
                which,
                Path::new(model),
                Path::new(taesd),
                size.parse().expect("size"),
                repeats,
            )
        }
        _ => println!(
            "taesd: no mode given, nothing run. Use benches/taesd.sh, or\n  \
             cargo bench --bench taesd -- make DIR\n  \
             cargo bench --bench taesd -- decode vae|taesd MODEL TAESD SIZE [REPEATS]"
        ),
    }
}
