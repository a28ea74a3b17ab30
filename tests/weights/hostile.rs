//! Hostile files: each gives one line naming the problem (and the file), never a panic or a huge
//! allocation.

use super::*;

#[test]
fn missing_empty_short_and_foreign_files() {
    let dir = temp_dir("foreign");
    assert_open_error(
        &dir.join("absent.safetensors"),
        &["absent.safetensors", "no such file"],
    );
    let cases: [(&str, Vec<u8>, &[&str]); 6] = [
        ("empty.safetensors", vec![], &["empty"]),
        (
            "seven.safetensors",
            b"\x10\0\0\0\0\0\0".to_vec(),
            &["only 7 bytes long", "header length is missing"],
        ),
        (
            "image.safetensors",
            [&b"\x89PNG\r\n\x1a\n"[..], &[0; 64]].concat(),
            &["PNG image"],
        ),
        (
            "model.ckpt",
            [&b"PK\x03\x04\x14\0\0\x08"[..], &[7; 64]].concat(),
            &["zip archive", "convert it to .safetensors"],
        ),
        (
            "page.safetensors",
            b"<!DOCTYPE html><html>404</html>".to_vec(),
            &["HTML"],
        ),
        (
            "lfs.safetensors",
            b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n".to_vec(),
            &["Git LFS", "git lfs pull"],
        ),
    ];
    for (name, bytes, needles) in cases {
        std::fs::write(dir.join(name), bytes).unwrap();
        let common = [name, "not a valid .safetensors file"];
        assert_open_error(&dir.join(name), &[&common[..], needles].concat());
    }
    // Pseudo-random bytes (a fixed LCG): no panic, and a message about the header.
    let mut x = 0x2545F4914F6CDD1Du64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            (x >> 56) as u8
        })
        .collect();
    std::fs::write(dir.join("noise.bin"), noise).unwrap();
    assert_open_error(&dir.join("noise.bin"), &["not a valid .safetensors file"]);
    assert_open_error(Path::new("/dev/null"), &["/dev/null", "not a regular file"]);
}

#[test]
fn header_length_and_truncation() {
    let dir = temp_dir("truncation");
    let huge = dir.join("huge-header.safetensors");
    std::fs::write(&huge, [&(1u64 << 60).to_le_bytes()[..], b"{}"].concat()).unwrap();
    assert_open_error(
        &huge,
        &["header length 1152921504606846976", "past the end"],
    );
    let whole = std::fs::read(ldm_file()).unwrap();
    let cut = dir.join("cut-in-data.safetensors");
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    assert_open_error(&cut, &["truncated"]);
    let cut = dir.join("cut-in-header.safetensors");
    std::fs::write(&cut, &whole[..100]).unwrap();
    assert_open_error(&cut, &["past the end", "truncated"]);
}

#[test]
fn bad_headers_name_the_problem() {
    let dir = temp_dir("headers");
    let f32x4 =
        |offsets: &str| format!(r#"{{"dtype":"F32","shape":[4],"data_offsets":{offsets}}}"#);
    let cases: Vec<(&str, Vec<u8>, usize, Vec<&str>)> = vec![
        (
            "past_end",
            format!(r#"{{"a":{}}}"#, f32x4("[0,16]")).into_bytes(),
            8,
            vec!["`a`", "ends at byte 16", "only 8 data bytes"],
        ),
        (
            "overlap",
            format!(r#"{{"a":{},"b":{}}}"#, f32x4("[0,16]"), f32x4("[8,24]")).into_bytes(),
            24,
            vec!["`b`", "overlaps tensor `a`"],
        ),
        (
            "gap",
            format!(r#"{{"a":{},"b":{}}}"#, f32x4("[0,16]"), f32x4("[20,36]")).into_bytes(),
            36,
            vec!["gap of 4", "`b`"],
        ),
        (
            "size",
            format!(r#"{{"a":{}}}"#, f32x4("[0,12]")).into_bytes(),
            12,
            vec!["`a`", "needs 16 bytes", "holds 12"],
        ),
        (
            "reversed",
            format!(r#"{{"a":{}}}"#, f32x4("[16,0]")).into_bytes(),
            16,
            vec!["`a`", "end before they start"],
        ),
        (
            "overflow",
            br#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}}"#
                .to_vec(),
            0,
            vec!["`a`", "too large"],
        ),
        (
            "json",
            br#"{"a": {"dtype": "F32", "#.to_vec(),
            0,
            vec!["not valid JSON"],
        ),
        (
            "utf8",
            b"{\"\xff\xfe\":{}}".to_vec(),
            0,
            vec!["not valid UTF-8"],
        ),
        (
            "twice",
            format!(r#"{{"a":{},"a":{}}}"#, f32x4("[0,16]"), f32x4("[16,32]")).into_bytes(),
            32,
            vec!["`a` is listed twice"],
        ),
        (
            "dtype",
            br#"{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}"#.to_vec(),
            16,
            vec!["`a`", "unknown element type `F128`"],
        ),
        (
            "negative",
            br#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#.to_vec(),
            4,
            vec!["`a`", "bad header entry"],
        ),
        (
            "trailing",
            format!(r#"{{"a":{}}}"#, f32x4("[0,16]")).into_bytes(),
            20,
            vec!["4 trailing bytes"],
        ),
        (
            "not_object",
            b"[1, 2, 3]".to_vec(),
            0,
            vec!["does not start with `{`"],
        ),
        (
            "not_map",
            br#"{"a": [1, 2]}"#.to_vec(),
            0,
            vec!["`a`", "bad header entry"],
        ),
        (
            "rank",
            br#"{"a":{"dtype":"F32","shape":[1,1,1,1,1,1,1,1,1,1],"data_offsets":[0,4]}}"#.to_vec(),
            4,
            vec!["more than 8 dimensions"],
        ),
    ];
    for (name, header, data_len, needles) in cases {
        let file_name = format!("{name}.safetensors");
        let path = dir.join(&file_name);
        write_raw(&path, &header, data_len);
        let mut needles: Vec<&str> = needles;
        needles.extend([file_name.as_str(), "not a valid .safetensors file"]);
        assert_open_error(&path, &needles);
    }
    // End offsets summing past u64: safetensors' own check would overflow here.
    let size = (1u64 << 61) - 1;
    let entries: Vec<String> = (0..8)
        .map(|i| {
            format!(
                r#""t{i}":{{"dtype":"U8","shape":[{size}],"data_offsets":[{},{}]}}"#,
                i * size,
                (i + 1) * size
            )
        })
        .collect();
    let path = dir.join("sum_overflow.safetensors");
    write_raw(&path, format!("{{{}}}", entries.join(",")).as_bytes(), 0);
    assert_open_error(&path, &["truncated"]);
}

#[test]
fn empty_header_is_an_empty_store_and_metadata_is_ignored() {
    let dir = temp_dir("metadata");
    let path = dir.join("meta.safetensors");
    write_raw(
        &path,
        br#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        4,
    );
    let store = TensorStore::open(&path).unwrap();
    assert_eq!(
        store
            .tensors()
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>(),
        ["a"]
    );
    let path = dir.join("nothing.safetensors");
    write_raw(&path, b"{}", 0);
    assert!(TensorStore::open(&path).unwrap().tensors().is_empty());
}
