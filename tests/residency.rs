//! Weight page residency on a real file: releasing drops a tensor's pages from the page cache, and
//! reading ahead brings back all of a range far longer than the kernel's read-ahead size (one
//! `MADV_WILLNEED` over the whole range reads only its first read-ahead's worth).

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sdcap::weights::{Reader, TensorStore};

const BYTES: usize = 64 << 20;

/// Pages of `path` in the page cache, and all its pages (`mincore` over a fresh mapping).
fn cached_pages(path: &Path) -> (usize, usize) {
    let file = File::open(path).unwrap();
    // SAFETY: a read-only private mapping of a file this test owns and does not change.
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    let page = 4096;
    let pages = map.len().div_ceil(page);
    let mut vec = vec![0u8; pages];
    // SAFETY: `vec` has one byte per page of the mapping, as mincore requires.
    let rc = unsafe {
        libc::mincore(
            map.as_ptr() as *mut libc::c_void,
            map.len(),
            vec.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "mincore");
    (vec.iter().filter(|&&v| v & 1 == 1).count(), pages)
}

fn wait_for(what: &str, path: &Path, done: impl Fn(usize, usize) -> bool) {
    let start = Instant::now();
    loop {
        let (cached, pages) = cached_pages(path);
        if done(cached, pages) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what}: {cached} of {pages} pages cached"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn release_drops_pages_and_the_reader_brings_back_a_whole_long_tensor() {
    // In the target directory, on the disk the build uses: the page cache of tmpfs cannot be
    // dropped, and the test needs a file whose pages can be.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("residency");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("long.safetensors");
    let data: Vec<u8> = (0..BYTES).map(|i| (i % 251) as u8).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![BYTES / 4], &data)
            .unwrap();
    safetensors::serialize_to_file(vec![("block.w", view)], None, &path).unwrap();
    File::open(&path).unwrap().sync_all().unwrap();

    let store = Arc::new(TensorStore::open(&path).unwrap());
    store.release("block.");
    let (cached, pages) = cached_pages(&path);
    assert!(
        cached < pages / 16,
        "release left {cached} of {pages} pages cached ({} cannot drop its page cache)",
        dir.display()
    );

    // A release while a read is asked for stops it: nothing much is read.
    store.prefetch("block.", &|| false);
    assert!(cached_pages(&path).0 < pages / 16);

    let reader = Reader::new(store.clone(), vec!["block.".into()]);
    reader.read(0);
    // All of the tensor's pages (the header page and the tail may be read too).
    wait_for("read ahead", &path, |cached, pages| cached + 2 >= pages);
    reader.release(0);
    wait_for("released", &path, |cached, pages| cached < pages / 16);
}
