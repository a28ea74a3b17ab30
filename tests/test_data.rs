//! `tests/data`, the test data the repository carries: its size budget, its MANIFEST, its deltas.

mod common;

use std::path::{Path, PathBuf};

use common::{crc32, data_dir, files_below, Delta};

const MB: u64 = 1_000_000;
/// Everything but the other families' folders: the SD1 model's data, goldens, rng, tokenizer, tools.
const SD1_BUDGET: u64 = 40 * MB;
/// Each of `tiny-sd2/` and `tiny-sdxl/`.
const FAMILY_BUDGET: u64 = 12 * MB;
const FAMILIES: [&str; 2] = ["tiny-sd2", "tiny-sdxl"];
/// Files of the folder itself, not data.
const OWN_FILES: [&str; 3] = ["MANIFEST", "README.md", "refresh.py"];

fn size(files: &[PathBuf]) -> u64 {
    files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum()
}

#[test]
fn data_folder_keeps_its_budget() {
    let data = data_dir();
    let files = files_below(&data);
    let family = |f: &Path, name: &str| f.strip_prefix(&data).unwrap().starts_with(name);
    let sd1: Vec<_> = files
        .iter()
        .filter(|f| !FAMILIES.iter().any(|n| family(f, n)))
        .cloned()
        .collect();
    let sd1_size = size(&sd1);
    eprintln!("tests/data SD1: {sd1_size} bytes (budget {SD1_BUDGET})");
    assert!(
        sd1_size <= SD1_BUDGET,
        "tests/data holds {sd1_size} bytes of SD1 data, over its budget of {SD1_BUDGET}: trim MANIFEST \
         (keys=, delta=) or raise the budget here and in tests/data/README.md"
    );
    for name in FAMILIES {
        let mine: Vec<_> = files.iter().filter(|f| family(f, name)).cloned().collect();
        let bytes = size(&mine);
        eprintln!("tests/data/{name}: {bytes} bytes (budget {FAMILY_BUDGET})");
        assert!(
            bytes <= FAMILY_BUDGET,
            "tests/data/{name} holds {bytes} bytes, over its budget of {FAMILY_BUDGET}"
        );
    }
}

/// The MANIFEST's entries: (path, is a folder, is a delta).
fn manifest() -> Vec<(String, bool, bool)> {
    let text = std::fs::read_to_string(data_dir().join("MANIFEST")).unwrap();
    text.lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mut words = l.split_whitespace();
            let path = words.next().unwrap();
            let delta = words.any(|w| w.starts_with("delta="));
            (
                path.trim_end_matches('/').to_string(),
                path.ends_with('/'),
                delta,
            )
        })
        .collect()
}

/// Every file of the folder comes from a MANIFEST line (a file put there by hand would be lost at the
/// next refresh), and every file line of MANIFEST is there (as `PATH.delta` for a delta).
#[test]
fn data_folder_holds_what_manifest_names() {
    let data = data_dir();
    let entries = manifest();
    assert!(
        entries.len() > 10,
        "MANIFEST lists {} entries",
        entries.len()
    );
    for file in files_below(&data) {
        let rel = file
            .strip_prefix(&data)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        if OWN_FILES.contains(&rel.as_str()) {
            continue;
        }
        let listed = entries.iter().any(|(path, folder, delta)| {
            if *folder {
                rel.starts_with(&format!("{path}/"))
            } else if *delta {
                rel == format!("{path}.delta")
            } else {
                rel == *path
            }
        });
        assert!(listed, "tests/data/{rel} is not in tests/data/MANIFEST");
    }
    for (path, folder, delta) in &entries {
        let there = match (folder, delta) {
            (true, _) => data.join(path).is_dir(),
            (false, true) => data.join(format!("{path}.delta")).is_file(),
            (false, false) => data.join(path).is_file(),
        };
        assert!(
            there,
            "MANIFEST names {path}, which tests/data lacks: run tests/data/refresh.py"
        );
    }
}

#[test]
fn crc32_is_zlibs() {
    // The check value of CRC-32/ISO-HDLC, and Python's zlib.crc32(b"sdcap").
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    assert_eq!(crc32(b""), 0);
    assert_eq!(crc32(b"sdcap"), 0xAA66_53F5);
}

/// Every delta rebuilds a file of its recorded size and CRC-32, and one changed byte is caught.
#[test]
fn deltas_rebuild_and_a_changed_byte_is_caught() {
    let deltas: Vec<_> = files_below(&data_dir())
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "delta"))
        .collect();
    assert!(!deltas.is_empty());
    for file in &deltas {
        let rebuilt = Delta::read(file).rebuild(file);
        eprintln!("{}: {} bytes", file.display(), rebuilt.len());
    }
    // A delta with literal bytes, one of them changed: the rebuild must refuse it.
    let file = deltas
        .iter()
        .max_by_key(|f| std::fs::metadata(f).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let bad = Path::new(env!("CARGO_TARGET_TMPDIR")).join("changed.delta");
    std::fs::write(&bad, &bytes).unwrap();
    let delta = Delta::read(&bad);
    let caught = std::panic::catch_unwind(|| delta.rebuild(&bad));
    assert!(caught.is_err(), "a changed byte was not caught");
}
