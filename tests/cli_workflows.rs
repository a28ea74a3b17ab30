//! img2img, inpainting, TAESD and LoRA through the command line, as a user runs them, against the
//! diffusers goldens of `tiny-sd/workflows` (the library-level tests in img2img.rs, inpaint.rs,
//! taesd.rs and lora.rs check the same numbers without the CLI in between).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{read_tensors, tiny};

fn sdcap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdcap"))
        .args(args)
        .arg("--progress")
        .arg("none")
        .output()
        .expect("run sdcap")
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// RGB bytes of a PNG.
fn pixels(path: &Path) -> Vec<u8> {
    let decoder = png::Decoder::new(fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    buf
}

/// The PNG against diffusers' `image_uint8`, with the library tests' whole-run tolerance.
fn assert_image_matches(what: &str, png: &Path, golden: &Path) {
    let want = &read_tensors(golden)["image_uint8"].data;
    common::assert_pixels_match(what, &pixels(png), want);
}

fn workflows(rel: &str) -> PathBuf {
    tiny(&format!("workflows/{rel}"))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The fixtures' request: "a photo of a cat", negative "", CFG 7.5, seed 42.
fn base_args<'a>(model: &'a str, sampler: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "generate",
        "-m",
        model,
        "-p",
        "a photo of a cat",
        "-n",
        "",
        "--cfg-scale",
        "7.5",
        "-s",
        "42",
        "--sampling-method",
        sampler,
        "--steps",
        steps,
    ]
}

#[test]
fn img2img_through_the_cli_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny("tiny-sd-fp32.safetensors");
    for (case, sampler, scheduler, strength, init) in [
        (
            "euler_a_str0.6_64x96_e2e",
            "euler_a",
            "discrete",
            "0.6",
            "init_64x96.png",
        ),
        (
            "ddim_str0.3_64x64_e2e",
            "ddim",
            "discrete",
            "0.3",
            "init_64x64.png",
        ),
        (
            "dpmpp_2m_karras_str1.0_64x64_e2e",
            "dpm++2m",
            "karras",
            "1.0",
            "init_64x64.png",
        ),
    ] {
        let out_png = dir.path().join(format!("{case}.png"));
        let init = workflows(&format!("inputs/{init}"));
        // No -W/-H: the size is the picture's own.
        let mut args = base_args(s(&model), sampler, "8");
        args.extend(["--scheduler", scheduler, "--strength", strength]);
        args.extend(["-i", s(&init), "-o", s(&out_png)]);
        ok(&sdcap(&args));
        let golden = workflows(&format!("img2img/{case}.safetensors"));
        assert_image_matches(case, &out_png, &golden);
    }
}

#[test]
fn inpainting_through_the_cli_matches_diffusers_with_both_unets() {
    let dir = tempfile::tempdir().unwrap();
    let plain = tiny("tiny-sd-fp32.safetensors");
    let inpainting = common::fixtures().join("tiny-sd-inpaint/tiny-sd-inpaint-fp32.safetensors");
    for (case, model, sampler, strength) in [
        ("unet4_euler_str0.75_e2e", &plain, "euler", "0.75"),
        ("unet4_euler_a_str1.0_e2e", &plain, "euler_a", "1.0"),
        ("unet9_euler_str0.75_e2e", &inpainting, "euler", "0.75"),
        ("unet9_euler_a_str1.0_e2e", &inpainting, "euler_a", "1.0"),
    ] {
        let out_png = dir.path().join(format!("{case}.png"));
        let (init, mask) = (
            workflows("inputs/init_64x64.png"),
            workflows("inputs/mask_64x64.png"),
        );
        let mut args = base_args(s(model), sampler, "8");
        args.extend(["--strength", strength, "-i", s(&init), "--mask", s(&mask)]);
        args.extend(["-o", s(&out_png)]);
        ok(&sdcap(&args));
        let golden = workflows(&format!("inpaint/{case}.safetensors"));
        assert_image_matches(case, &out_png, &golden);
    }
}

#[test]
fn taesd_decode_through_the_cli_matches_diffusers_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny("tiny-sd-fp32.safetensors");
    let taesd = common::fixtures().join("tiny-taesd/diffusers");
    let out_png = dir.path().join("t.png");
    let mut args = base_args(s(&model), "euler", "4");
    args.extend([
        "-W",
        "64",
        "-H",
        "64",
        "--taesd",
        s(&taesd),
        "-o",
        s(&out_png),
    ]);
    ok(&sdcap(&args));
    let golden = workflows("taesd/txt2img_euler_taesd.safetensors");
    assert_image_matches("taesd", &out_png, &golden);
    let bytes = fs::read(&out_png).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.contains("TAESD: diffusers"),
        "PNG parameters name TAESD"
    );
}

/// The seed case through `sdcap batch`: 20 jobs alternating no LoRA, one at 0.5 and two at
/// 0.7/0.3 on a q4_0 model run to the end, each image bit-identical to the same job run alone with
/// `generate`, and the resident set after job 20 within 2% of job 5's (no state piles up).
#[test]
fn a_batch_alternating_loras_equals_each_job_alone() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny("gguf/tiny-sd-q4_0.gguf");
    let (a, b) = (
        workflows("lora/lora_a_kohya.safetensors"),
        workflows("lora/lora_b_kohya.safetensors"),
    );
    let configs: [Vec<String>; 3] = [
        vec![],
        vec![format!("{}:0.5", s(&a))],
        vec![format!("{}:0.7", s(&a)), format!("{}:0.3", s(&b))],
    ];
    let jobs: String = (0..20)
        .map(|i| {
            let lora = serde_json::to_string(&configs[i % 3]).unwrap();
            format!(
                "{{\"prompt\": \"a photo of a cat\", \"seed\": {}, \"lora\": {lora}}}\n",
                i % 3
            )
        })
        .collect();
    let file = dir.path().join("jobs.jsonl");
    fs::write(&file, jobs).unwrap();
    let out_dir = dir.path().join("out");
    let common_flags = ["-W", "64", "-H", "64", "--steps", "3", "-t", "1"];
    let mut args = vec!["batch", s(&file), "-m", s(&model), "-o", s(&out_dir)];
    args.extend(common_flags);
    ok(&sdcap(&args));
    let made: BTreeMap<String, Vec<u8>> = fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                pixels(&p),
            )
        })
        .collect();
    assert_eq!(made.len(), 20, "every job wrote its image");
    for (config, loras) in configs.iter().enumerate() {
        let alone = dir.path().join(format!("alone{config}.png"));
        let seed = config.to_string();
        let mut args = vec!["generate", "-m", s(&model), "-p", "a photo of a cat"];
        args.extend(["-s", &seed, "-o", s(&alone)]);
        args.extend(common_flags);
        for l in loras {
            args.extend(["--lora", l]);
        }
        ok(&sdcap(&args));
        let want = pixels(&alone);
        for (name, got) in &made {
            let index: usize = name[..6].parse().unwrap();
            if index % 3 == config {
                assert!(*got == want, "job {index} differs from the same job alone");
            }
        }
    }
    // RSS after each job, from the results log.
    let log = fs::read_to_string(out_dir.join("results.jsonl")).unwrap();
    let rss: BTreeMap<u64, f64> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| (v["job"].as_u64().unwrap(), v["rss_mib"].as_f64().unwrap()))
        .collect();
    let (fifth, last) = (rss[&4], rss[&19]);
    assert!(
        (last - fifth).abs() <= 0.02 * fifth,
        "RSS after job 20 {last} MiB vs job 5 {fifth} MiB"
    );
}
