//! `sdcap inspect` names SD2.x and SDXL, from their single files and from diffusers folders (built from
//! the single files at test time).

mod common;
#[path = "common/diffusers_folder.rs"]
mod diffusers_folder;

use std::path::PathBuf;

use sdcap::inspect::{inspect, Format};

fn temp_dir(test: &str) -> PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("inspect_families")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn sd2_and_sdxl_are_named_in_both_layouts() {
    for (dir, file, family, tensors) in [
        ("tiny-sd2", "tiny-sd2-fp32.safetensors", "SD2.x", 752),
        ("tiny-sdxl", "tiny-sdxl-fp32.safetensors", "SDXL", 933),
    ] {
        let single = common::fixtures().join(dir).join(file);
        let report = inspect(&single).unwrap();
        assert_eq!(report.format, Format::Safetensors);
        assert_eq!(report.family, family, "{dir}");
        assert_eq!(report.tensors, tensors, "{dir}");

        let folder = temp_dir(dir);
        let plan = diffusers_folder::build(&single, &folder);
        let report = inspect(&folder).unwrap();
        assert_eq!(report.format, Format::Diffusers);
        assert_eq!(report.family, family, "{dir} folder");
        assert_eq!(report.tensors, plan.entries.len(), "{dir} folder");
    }
    // The table names it too.
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_sdcap"))
        .args(["inspect"])
        .arg(common::fixtures().join("tiny-sd2/tiny-sd2-fp32.safetensors"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success() && text.contains("family:  SD2.x"),
        "{text}"
    );
}
