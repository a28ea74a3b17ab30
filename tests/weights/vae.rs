//! A separate VAE replacing the model's `first_stage_model.*`, in each layout users download.

use super::*;

/// The tiny model's VAE tensors with every f32 value + 1, named by `name(ldm_name_without_prefix)`.
fn shifted_vae(name: &dyn Fn(&str) -> String) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let ldm = TensorStore::open(&ldm_file()).unwrap();
    ldm.tensors()
        .iter()
        .filter_map(|t| {
            let bare = t.name.strip_prefix("first_stage_model.")?;
            let data = ldm
                .bytes(t)
                .chunks_exact(4)
                .flat_map(|c| (f32::from_le_bytes(c.try_into().unwrap()) + 1.0).to_le_bytes());
            Some((name(bare), Dtype::F32, t.shape.clone(), data.collect()))
        })
        .collect()
}

/// `store` has the shifted VAE from `vae_path`, the rest from the tiny model, and nothing more.
fn assert_vae_replaced(store: &TensorStore, vae_path: &Path) {
    let original = TensorStore::open(&ldm_file()).unwrap();
    assert_eq!(store.tensors().len(), original.tensors().len());
    for t in original.tensors() {
        let now = store.get(&t.name).unwrap();
        let is_vae = t.name.starts_with("first_stage_model.");
        assert_eq!(store.path_of(now) == vae_path, is_vae, "{}", t.name);
        let mut a = vec![0.0; t.numel()];
        let mut b = vec![0.0; t.numel()];
        original.read_f32(t, &mut a).unwrap();
        store.read_f32(now, &mut b).unwrap();
        let shift = if is_vae { 1.0 } else { 0.0 };
        assert!(a.iter().zip(&b).all(|(x, y)| x + shift == *y), "{}", t.name);
    }
}

#[test]
fn standalone_ldm_vae_replaces_first_stage_model() {
    let path = temp_dir("ldm_vae").join("vae-ft-mse.safetensors");
    let mut tensors = shifted_vae(&|bare| bare.to_string());
    // Training leftovers that standalone VAE downloads can carry.
    tensors.push(("loss.logvar".into(), Dtype::F32, vec![], vec![0; 4]));
    tensors.push(("model_ema.decay".into(), Dtype::F32, vec![], vec![0; 4]));
    write_tensors(&path, &tensors);
    let store = TensorStore::open(&ldm_file())
        .unwrap()
        .with_vae(&path)
        .unwrap();
    assert_vae_replaced(&store, &path);
}

#[test]
fn checkpoint_as_vae_contributes_only_first_stage_model() {
    let path = temp_dir("checkpoint_vae").join("other-model.safetensors");
    let mut tensors = shifted_vae(&|bare| format!("first_stage_model.{bare}"));
    tensors.push((
        "model.diffusion_model.input_blocks.0.0.bias".into(),
        Dtype::F32,
        vec![32],
        vec![7; 128],
    ));
    write_tensors(&path, &tensors);
    // Works the same on a store opened from the diffusers folder.
    let store = TensorStore::open(&tiny().join("diffusers"))
        .unwrap()
        .with_vae(&path)
        .unwrap();
    let ldm = TensorStore::open(&ldm_file()).unwrap();
    let bias = "model.diffusion_model.input_blocks.0.0.bias";
    assert!(store.bytes(store.get(bias).unwrap()) == ldm.bytes(ldm.get(bias).unwrap()));
    let store = TensorStore::open(&ldm_file())
        .unwrap()
        .with_vae(&path)
        .unwrap();
    assert_vae_replaced(&store, &path);
}

#[test]
fn diffusers_vae_file_or_folder_replaces_first_stage_model() {
    let vae_dir = tiny().join("diffusers/vae");
    let vae_file = vae_dir.join("diffusion_pytorch_model.safetensors");
    let ldm = TensorStore::open(&ldm_file()).unwrap();
    for given in [vae_file.clone(), vae_dir, tiny().join("diffusers")] {
        let store = TensorStore::open(&ldm_file())
            .unwrap()
            .with_vae(&given)
            .unwrap();
        assert_eq!(
            store.tensors().len(),
            ldm.tensors().len(),
            "{}",
            given.display()
        );
        for t in store
            .tensors()
            .iter()
            .filter(|t| t.name.starts_with("first_stage_model."))
        {
            assert_eq!(store.path_of(t), vae_file);
            assert!(
                store.bytes(t) == ldm.bytes(ldm.get(&t.name).unwrap()),
                "{}",
                t.name
            );
        }
    }
}

#[test]
fn unusable_vae_files_are_refused() {
    let dir = temp_dir("bad_vae");
    let model = || TensorStore::open(&ldm_file()).unwrap();
    let text = tiny().join("diffusers/text_encoder/model.safetensors");
    assert_one_line(
        &model().with_vae(&text).err().unwrap(),
        &["model.safetensors", "holds no VAE decoder"],
    );
    let wide = dir.join("flux-vae.safetensors");
    write_zeros(&wide, &[("decoder.conv_in.weight", vec![8, 16, 3, 3])]);
    assert_one_line(
        &model().with_vae(&wide).err().unwrap(),
        &["16-channel latents", "uses 4"],
    );
    assert_one_line(
        &model()
            .with_vae(&dir.join("nope.safetensors"))
            .err()
            .unwrap(),
        &["no such file"],
    );
    let odd = dir.join("odd-diffusers-vae.safetensors");
    write_zeros(
        &odd,
        &[
            ("decoder.conv_in.weight", vec![8, 4, 3, 3]),
            ("decoder.up_blocks.0.resnets.0.conv9.weight", vec![1]),
        ],
    );
    assert_one_line(
        &model().with_vae(&odd).err().unwrap(),
        &["conv9", "not part of an SD VAE"],
    );
}
