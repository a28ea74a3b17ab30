//! Sizes whose latent sides the UNet's downsamplers leave odd (issue 14, defect 3): diffusers
//! resizes each upsampler's output to the skip it meets (`forward_upsample_size`); so do we.
//! Checked against `tiny-sd/e2e-odd-sizes/` (seeded txt2img through the public API) and, for the
//! deeper SD2/SDXL UNets, on shapes only the resize path can join.

mod common;

use std::sync::Arc;

use common::{fixtures, read_tensors, tiny};
use sdcap::job::{Job, ScheduleKind};
use sdcap::kernels::scratch::TIERS;
use sdcap::nn::unet::{HeadsRule, UNet};
use sdcap::pipeline;
use sdcap::weights::{TensorStore, Weights};
use sdcap::Tensor;

#[test]
fn odd_latent_sides_match_diffusers_end_to_end() {
    common::compute_threads();
    let manifest = common::read_manifest(&tiny("e2e-odd-sizes/manifest.json"));
    let cases = manifest["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let job = Job {
            negative: Some(case["negative"].as_str().unwrap().into()),
            width: case["width"].as_u64().unwrap() as u32,
            height: case["height"].as_u64().unwrap() as u32,
            steps: case["steps"].as_u64().unwrap() as u32,
            cfg_scale: case["cfg"].as_f64().unwrap() as f32,
            sampler: case["sampler"].as_str().unwrap().parse().unwrap(),
            scheduler: ScheduleKind::Discrete,
            seed: case["seed"].as_u64().unwrap(),
            clip_skip: case["clip_skip"].as_u64().unwrap() as u32,
            ..Job::new(
                tiny("tiny-sd-fp32.safetensors"),
                case["prompt"].as_str().unwrap(),
            )
        };
        let got = pipeline::txt2img(&job, &mut |_| {}).unwrap();
        let refs = read_tensors(&tiny(&format!("e2e-odd-sizes/{name}.safetensors")));
        common::assert_run_matches(name, &got, &refs);
    }
}

fn family_unet(family: &str) -> UNet {
    let path = fixtures()
        .join(family)
        .join(format!("{family}-fp32.safetensors"));
    let store = TensorStore::open(&path).expect("tiny model opens");
    UNet::new(
        &Weights::new(Arc::new(store), "model.diffusion_model"),
        HeadsRule::Width(8),
    )
    .unwrap()
}

/// The SD2 and SDXL UNets downsample twice: latent sides 9 → 5 → 3 and 11 → 6 → 3 are joined
/// back by resizing 3 → 5/6 → 9/11 (one odd, one even step on each path). The output has the
/// input's shape and its values are finite; and every image of a batch gets the bits it gets
/// alone (the resize reads per image).
#[test]
fn deeper_unets_take_sides_their_downsampling_leaves_odd() {
    common::compute_threads();
    for family in ["tiny-sd2", "tiny-sdxl"] {
        let unet = family_unet(family);
        let refs = read_tensors(
            &fixtures()
                .join(family)
                .join("golden/unet_forward.safetensors"),
        );
        let ctx = &refs["encoder_hidden_states"].data;
        let tier = TIERS[0];
        let (n, h, w) = (2, 9, 11);
        let x = Tensor::new(
            vec![n, 4, h, w],
            (0..n * 4 * h * w)
                .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
                .collect(),
        );
        let added = unet.adm_in_channels().map(|_| {
            let ids = [72.0, 88.0, 0.0, 0.0, 72.0, 88.0].repeat(n);
            unet.added_conditioning(&refs["text_embeds"].data, &ids)
                .unwrap()
        });
        let out = unet.forward_added(
            &x,
            &[500.0, 999.0],
            ctx,
            added.as_deref(),
            &sdcap::nn::Ctx::from(tier),
            &mut |_, _| {},
        );
        assert_eq!(out.shape, [n, 4, h, w], "{family}");
        assert!(out.data.iter().all(|v| v.is_finite()), "{family}");
        // The second image alone.
        let one = Tensor::new(vec![1, 4, h, w], x.data[4 * h * w..].to_vec());
        let ctx_one = &ctx[ctx.len() / 2..];
        let added_one = added.as_ref().map(|y| &y[y.len() / 2..]);
        let alone = unet.forward_added(
            &one,
            &[999.0],
            ctx_one,
            added_one,
            &sdcap::nn::Ctx::from(tier),
            &mut |_, _| {},
        );
        let max = out.data[4 * h * w..]
            .iter()
            .zip(&alone.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(max <= 1e-4, "{family}: batch vs alone {max:e}");
    }
}

/// The memory model follows odd sides as the forward pass does (no panic, the map sizes of
/// ceil-halving and resizing) and lies between the even sizes around them.
#[test]
fn memory_model_walks_odd_sides() {
    for family in ["tiny-sd2", "tiny-sdxl"] {
        let unet = family_unet(family);
        let peak = |h, w| unet.peak_activation_bytes(2, (h, w), 77, &TIERS[0], 4);
        let (lo, odd, hi) = (peak(8, 8), peak(9, 11), peak(12, 12));
        assert!(lo <= odd && odd <= hi, "{family}: {lo} {odd} {hi}");
    }
}

/// The command: `sdcap generate -W 64 -H 72 --steps 1` panicked ("concat shapes", exit
/// 101); it now writes a 64×72 PNG and exits 0.
#[test]
fn the_cli_generates_odd_latent_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("odd.png");
    let model = tiny("tiny-sd-fp32.safetensors");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_sdcap"))
        .args(["generate", "-m"])
        .arg(&model)
        .args(["-p", "x", "-W", "64", "-H", "72", "--steps", "1", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(0), "{stderr}");
    let png = std::fs::read(&out).unwrap();
    // IHDR: width and height, big-endian, at bytes 16..24.
    let side = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
    assert_eq!((side(16), side(20)), (64, 72));
}
