//! Which GGML type each tensor of a model is written in, and in what shape.
//!
//! Two policies. The default quantizes every convolution and linear weight whose rows fit the type's
//! blocks, flattening a conv weight [co, ci, kh, kw] to the matrix [co, ci·kh·kw] that the
//! convolution multiplies by anyway (so its rows are long enough for blocks); the original shape goes
//! in the file's metadata. `--compat sdcpp` reproduces stable-diffusion.cpp's `convert` exactly, so
//! the file loads there.

use quant::GgmlType;
use regex::Regex;

use crate::error::{Error, Result};
use crate::weights::DType;

/// The types `--type` accepts.
pub const TARGET_TYPES: &[GgmlType] = &[
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
    GgmlType::F16,
];

/// Tensors smaller than this stay in float in the default policy: blocks would save next to nothing
/// and such tensors (norm scales, small projections) are where precision matters most.
pub const MIN_QUANT_VALUES: usize = 4096;

/// Name prefixes of tensors no SD runtime reads: the DDPM training buffers (except `alphas_cumprod`),
/// CLIP's `position_ids`, the CLIP logit scales (0-d), EMA bookkeeping and the like.
/// stable-diffusion.cpp's `unused_tensors` list (src/model_loader.cpp), whose SD1/SD2/SDXL entries
/// are all here; both policies drop them. Not dropped: `v_pred` and `edm_vpred.sigma_max` (markers
/// that tell a v-prediction model, read by sd.cpp and by sdcap), SDXL's bigG `text_projection`
/// (pools the conditioning), `label_emb` (SDXL's size conditioning).
const UNUSED_PREFIXES: &[&str] = &[
    "betas",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "cond_stage_model.1.model.text_model.embeddings.position_ids",
    "cond_stage_model.transformer.vision_model.embeddings.position_ids",
    "cond_stage_model.model.logit_scale",
    // Not in sd.cpp's list: SD2.x conditions on hidden states, its projection head is never read
    // (sd.cpp's OpenCLIP-H has no such parameter and only warns about it).
    "cond_stage_model.model.text_projection",
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
    "conditioner.embedders.0.model.logit_scale",
    "conditioner.embedders.1.model.logit_scale",
    "model.diffusion_model.time_embedding.cond_proj.weight",
    "unet.time_embedding.cond_proj.weight",
    "model_ema.decay",
    "model_ema.num_updates",
    "model_ema.diffusion_model",
    "embedding_manager",
    "denoiser.sigmas",
    "ztsnr",
    "edm_vpred.sigma_min",
];

/// Prefixes of the transformers-named text towers a diffusers SD2.x / SDXL folder gives
/// (`key_map::SD2_TEXT_PREFIX`, `SDXL_TEXT2_PREFIX` + `text_model.`), which sd.cpp does not read.
const SD2_HF_TEXT: &str = "cond_stage_model.model.text_model.";
const SDXL_HF_TEXT2: &str = "conditioner.embedders.1.model.";
/// Where sd.cpp reads a transformers-named bigG (its name conversion maps `conditioner.embedders.1.` to
/// `cond_stage_model.1.` and expects `transformer.text_model.…`, `transformer.text_projection.weight`).
const SDCPP_HF_TEXT2: &str = "conditioner.embedders.1.transformer.";

/// Which policy decides the types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compat {
    /// stable-diffusion.cpp's `convert`: its type choices, no reshaping, no metadata.
    Sdcpp,
}

/// One `regex=type` entry of `--tensor-type-rules`.
#[derive(Clone, Debug)]
pub struct Rule {
    pub pattern: Regex,
    pub ty: GgmlType,
}

/// Parses `--tensor-type-rules`: comma-separated `regex=type`, matched anywhere in the tensor name
/// (anchor with `^`/`$`), first match wins. A regex containing `,` cannot be written here.
pub fn parse_rules(text: &str) -> Result<Vec<Rule>> {
    let mut rules = Vec::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (pattern, ty) = entry.rsplit_once('=').ok_or_else(|| {
            Error::BadRequest(format!(
                "tensor type rule `{entry}` is not `regex=type` (e.g. `attn=q8_0`)"
            ))
        })?;
        let ty = GgmlType::from_name(ty.trim()).ok_or_else(|| {
            Error::BadRequest(format!(
                "tensor type rule `{entry}`: unknown type `{}` (one of: {})",
                ty.trim(),
                GgmlType::all()
                    .map(GgmlType::name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let pattern = Regex::new(pattern).map_err(|e| {
            Error::BadRequest(format!(
                "tensor type rule `{entry}`: bad regex: {}",
                e.to_string().lines().last().unwrap_or("invalid").trim()
            ))
        })?;
        rules.push(Rule { pattern, ty });
    }
    Ok(rules)
}

/// What to do with one tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Not written (a training buffer or a non-float tensor no network reads).
    Drop,
    /// Written as `ty` with `shape` (PyTorch order); `flattened` when that is a 2-D view of the
    /// original shape (default policy only).
    Write {
        ty: GgmlType,
        shape: Vec<u64>,
        flattened: bool,
    },
}

/// The policy's inputs: the `--type`, the rules and which policy.
#[derive(Clone, Debug)]
pub struct Policy {
    pub ty: GgmlType,
    pub rules: Vec<Rule>,
    pub compat: Option<Compat>,
}

impl Policy {
    /// The type and shape tensor `name` (`dtype`, `shape`) is written with. An error if a rule names a
    /// type whose blocks do not fit the tensor's rows.
    pub fn choose(&self, name: &str, dtype: DType, shape: &[usize]) -> Result<Choice> {
        let info = Tensor { name, dtype, shape };
        if is_unused(name) || !dtype.is_float() {
            return Ok(Choice::Drop);
        }
        if self.compat == Some(Compat::Sdcpp) && name.starts_with(SD2_HF_TEXT) {
            return Err(Error::BadRequest(format!(
                "--compat sdcpp: `{name}` is an SD2.x text encoder from a diffusers folder; stable-diffusion.cpp \
                 reads SD2.x's text encoder under open_clip names (fused attn.in_proj_weight), which separate \
                 q/k/v tensors cannot give without copying them; quantize the single-file checkpoint, or leave \
                 out --compat"
            )));
        }
        if let Some(rule) = self.rules.iter().find(|r| r.pattern.is_match(name)) {
            return match self.layout(&info, rule.ty) {
                Some((shape, flattened)) => Ok(Choice::Write {
                    ty: rule.ty,
                    shape,
                    flattened,
                }),
                None => Err(Error::BadRequest(format!(
                    "tensor type rule `{}={}` does not fit tensor `{name}` {:?}: its rows of {} values \
                     are not whole {}-value blocks",
                    rule.pattern.as_str(),
                    rule.ty.name(),
                    info.shape,
                    self.row_len(&info),
                    rule.ty.info().block_elems
                ))),
            };
        }
        let ty = match self.compat {
            Some(Compat::Sdcpp) => sdcpp_type(&info, self.ty),
            None => default_type(&info, self.ty),
        };
        let (shape, flattened) = self
            .layout(&info, ty)
            .expect("policy types always fit the rows");
        Ok(Choice::Write {
            ty,
            shape,
            flattened,
        })
    }

    /// The written shape for `ty`, or None if `ty`'s blocks do not fit the rows. The default policy
    /// flattens tensors of more than two dims written in a block type.
    fn layout(&self, info: &Tensor, ty: GgmlType) -> Option<(Vec<u64>, bool)> {
        let shape: Vec<u64> = info.shape.iter().map(|&d| d as u64).collect();
        let block = ty.info().block_elems;
        let flatten = self.compat.is_none() && block > 1 && shape.len() > 2;
        if !self.row_len(info).is_multiple_of(block) {
            return None;
        }
        if flatten {
            let rows = shape[0];
            let row_len = shape[1..].iter().product();
            Some((vec![rows, row_len], true))
        } else {
            Some((shape, false))
        }
    }

    /// GGML's `ne0` of the written tensor: the last PyTorch dim, or for the default policy (which
    /// flattens) everything after the first dim.
    fn row_len(&self, info: &Tensor) -> usize {
        match (self.compat, info.shape) {
            (_, []) => 1,
            (_, [n]) => *n,
            (Some(Compat::Sdcpp), dims) => *dims.last().expect("not empty"),
            (None, dims) => dims[1..].iter().product(),
        }
    }
}

/// The name a tensor is written under: its store name, except that `--compat sdcpp` moves a diffusers
/// SDXL folder's transformers-named bigG (`conditioner.embedders.1.model.text_model.…`,
/// `….model.text_projection.weight`) to `conditioner.embedders.1.transformer.…`, the only place sd.cpp
/// reads transformers names for it. sdcap reads both (`key_map::ldm_key` maps it back).
pub fn written_name(compat: Option<Compat>, name: &str) -> String {
    let hf_bigg = name
        .strip_prefix(SDXL_HF_TEXT2)
        .filter(|rest| rest.starts_with("text_model.") || *rest == "text_projection.weight");
    match (compat, hf_bigg) {
        (Some(Compat::Sdcpp), Some(rest)) => format!("{SDCPP_HF_TEXT2}{rest}"),
        _ => name.to_string(),
    }
}

/// What the policy looks at.
struct Tensor<'a> {
    name: &'a str,
    dtype: DType,
    shape: &'a [usize],
}

impl Tensor<'_> {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

fn is_unused(name: &str) -> bool {
    UNUSED_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Embeddings and the time embedding: looked up or applied once, small next to the UNet, and
/// sensitive; both policies keep them in float (stable-diffusion.cpp's name rule).
fn is_embedding(name: &str) -> bool {
    name.contains("embedding") || name.contains("time_embed.") || name.contains("label_emb.")
}

/// The float type a tensor keeps when it is not quantized: f16 for f16/bf16 sources, f32 for f32
/// sources and for block-type sources (whose dequantized values f16 may not hold exactly).
fn keep_type(dtype: DType) -> GgmlType {
    match dtype {
        DType::F16 | DType::BF16 => GgmlType::F16,
        _ => GgmlType::F32,
    }
}

/// The source type itself, as GGML names it (for `--compat sdcpp`, which keeps it).
fn source_type(dtype: DType) -> GgmlType {
    match dtype {
        DType::F16 => GgmlType::F16,
        DType::BF16 => GgmlType::BF16,
        DType::Quant(ty) => ty,
        _ => GgmlType::F32,
    }
}

/// The default policy. A conv or linear weight (`*.weight`, two dims or more, not an embedding, at
/// least `MIN_QUANT_VALUES` values) is written as `target` if its (flattened) rows fit the blocks;
/// else as the legacy type of the same width if that fits (q4_K → q4_0, q5_K → q5_0, q6_K → q8_0);
/// else in f16. Everything else keeps its float type (`keep_type`).
fn default_type(info: &Tensor, target: GgmlType) -> GgmlType {
    let name = info.name;
    // open_clip's fused q;k;v (`attn.in_proj_weight`, SD2.x and SDXL's bigG) is a linear weight too:
    // whole rows of it are what the text encoder reads as q, k and v.
    let is_matrix = (name.ends_with(".weight") || name.ends_with(".in_proj_weight"))
        && info.shape.len() >= 2
        && !is_embedding(name)
        && info.numel() >= MIN_QUANT_VALUES;
    if !is_matrix {
        return keep_type(info.dtype);
    }
    let row_len = info.numel() / info.shape[0].max(1);
    let fallback = match target {
        GgmlType::Q4K => Some(GgmlType::Q4_0),
        GgmlType::Q5K => Some(GgmlType::Q5_0),
        GgmlType::Q6K => Some(GgmlType::Q8_0),
        _ => None,
    };
    [Some(target), fallback]
        .into_iter()
        .flatten()
        .find(|ty| row_len.is_multiple_of(ty.info().block_elems))
        .unwrap_or(GgmlType::F16)
}

/// stable-diffusion.cpp's `convert`: a tensor becomes `target` unless its name ends in `.bias` or
/// `.scale`, names an embedding, or (for block types) its innermost dim is not a whole number of
/// blocks; then it keeps the source type.
fn sdcpp_type(info: &Tensor, target: GgmlType) -> GgmlType {
    let name = info.name;
    let ne0 = info.shape.last().copied().unwrap_or(1);
    let convert = !name.ends_with(".bias")
        && !name.ends_with(".scale")
        && !is_embedding(name)
        && ne0.is_multiple_of(target.info().block_elems);
    if convert {
        target
    } else {
        source_type(info.dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(ty: GgmlType, compat: Option<Compat>, rules: &str) -> Policy {
        Policy {
            ty,
            rules: parse_rules(rules).unwrap(),
            compat,
        }
    }

    fn written(p: &Policy, name: &str, dtype: DType, shape: &[usize]) -> (GgmlType, Vec<u64>) {
        match p.choose(name, dtype, shape).unwrap() {
            Choice::Write { ty, shape, .. } => (ty, shape),
            Choice::Drop => panic!("{name} dropped"),
        }
    }

    const CONV: &str = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight";
    const LINEAR: &str =
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight";
    const NORM: &str = "model.diffusion_model.input_blocks.1.0.in_layers.0.weight";

    #[test]
    fn default_flattens_and_quantizes_convs() {
        let p = policy(GgmlType::Q4_0, None, "");
        let (ty, shape) = written(&p, CONV, DType::F16, &[320, 320, 3, 3]);
        assert_eq!((ty, shape), (GgmlType::Q4_0, vec![320, 2880]));
        let (ty, shape) = written(&p, LINEAR, DType::F32, &[320, 320]);
        assert_eq!((ty, shape), (GgmlType::Q4_0, vec![320, 320]));
        // conv_in: rows of 4·9 = 36 values fit no block.
        let (ty, shape) = written(&p, CONV, DType::F32, &[320, 4, 3, 3]);
        assert_eq!((ty, shape), (GgmlType::F16, vec![320, 4, 3, 3]));
    }

    #[test]
    fn default_keeps_small_and_special_tensors_float() {
        let p = policy(GgmlType::Q8_0, None, "");
        for (name, shape) in [
            (NORM, &[320][..]),
            (
                "model.diffusion_model.input_blocks.1.0.in_layers.2.bias",
                &[320],
            ),
            ("model.diffusion_model.time_embed.0.weight", &[1280, 320]),
            (
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                &[49408, 768],
            ),
            ("model.diffusion_model.tiny.weight", &[32, 32]),
            ("alphas_cumprod", &[1000]),
        ] {
            assert_eq!(
                written(&p, name, DType::F32, shape).0,
                GgmlType::F32,
                "{name}"
            );
            assert_eq!(
                written(&p, name, DType::BF16, shape).0,
                GgmlType::F16,
                "{name}"
            );
        }
    }

    #[test]
    fn k_quants_fall_back_by_width() {
        // Rows of 320 values: whole 32-blocks, not whole 256-blocks.
        for (k, legacy) in [
            (GgmlType::Q4K, GgmlType::Q4_0),
            (GgmlType::Q5K, GgmlType::Q5_0),
            (GgmlType::Q6K, GgmlType::Q8_0),
        ] {
            let p = policy(k, None, "");
            assert_eq!(written(&p, LINEAR, DType::F16, &[640, 320]).0, legacy);
            assert_eq!(written(&p, LINEAR, DType::F16, &[320, 1280]).0, k);
            assert_eq!(written(&p, CONV, DType::F16, &[320, 320, 3, 3]).0, legacy);
        }
    }

    #[test]
    fn drops_training_buffers_and_integers() {
        let p = policy(GgmlType::Q4_0, None, "");
        for name in ["betas", "posterior_mean_coef1", "model_ema.decay"] {
            assert_eq!(p.choose(name, DType::F32, &[1000]).unwrap(), Choice::Drop);
        }
        let ids = "cond_stage_model.transformer.text_model.embeddings.position_ids";
        assert_eq!(p.choose(ids, DType::I64, &[1, 77]).unwrap(), Choice::Drop);
        assert_eq!(
            p.choose("x.weight", DType::I32, &[64, 64]).unwrap(),
            Choice::Drop
        );
    }

    #[test]
    fn sdcpp_rule() {
        let p = policy(GgmlType::Q4_0, Some(Compat::Sdcpp), "");
        // Innermost dim 3: kept in the source type, not reshaped.
        assert_eq!(
            written(&p, CONV, DType::F32, &[320, 320, 3, 3]),
            (GgmlType::F32, vec![320, 320, 3, 3])
        );
        assert_eq!(
            written(&p, LINEAR, DType::F16, &[320, 320]).0,
            GgmlType::Q4_0
        );
        // Norm scales are converted (a quirk of the rule), biases and embeddings are not.
        assert_eq!(written(&p, NORM, DType::F32, &[320]).0, GgmlType::Q4_0);
        assert_eq!(written(&p, "a.bias", DType::BF16, &[320]).0, GgmlType::BF16);
        assert_eq!(
            written(
                &p,
                "model.diffusion_model.time_embed.0.weight",
                DType::F32,
                &[1280, 320]
            )
            .0,
            GgmlType::F32
        );
        // f16 has no size rule: the convs and alphas_cumprod become f16 too.
        let p = policy(GgmlType::F16, Some(Compat::Sdcpp), "");
        assert_eq!(
            written(&p, CONV, DType::F32, &[320, 4, 3, 3]).0,
            GgmlType::F16
        );
        assert_eq!(
            written(&p, "alphas_cumprod", DType::F32, &[1000]).0,
            GgmlType::F16
        );
    }

    #[test]
    fn sd2_and_sdxl_tensors() {
        let p = policy(GgmlType::Q4_0, None, "");
        // open_clip's fused q;k;v is a linear weight (SD2.x's OpenCLIP-H, SDXL's bigG).
        let in_proj = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight";
        assert_eq!(
            written(&p, in_proj, DType::F16, &[3840, 1280]),
            (GgmlType::Q4_0, vec![3840, 1280])
        );
        let in_bias = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias";
        assert_eq!(written(&p, in_bias, DType::F16, &[3072]).0, GgmlType::F16);
        // SDXL's size conditioning and pooled projection stay float; the v-prediction marker is kept.
        for (name, shape) in [
            (
                "model.diffusion_model.label_emb.0.0.weight",
                &[1280, 2816][..],
            ),
            (
                "conditioner.embedders.1.model.text_projection",
                &[1280, 1280],
            ),
            ("v_pred", &[]),
        ] {
            assert_eq!(
                written(&p, name, DType::F16, shape).0,
                GgmlType::F16,
                "{name}"
            );
        }
        for (name, dtype, shape) in [
            ("cond_stage_model.model.logit_scale", DType::F32, &[][..]),
            ("conditioner.embedders.1.model.logit_scale", DType::F32, &[]),
            (
                "cond_stage_model.model.text_projection",
                DType::F32,
                &[1024, 1024],
            ),
            (
                "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
                DType::I64,
                &[1, 77],
            ),
            ("ztsnr", DType::F32, &[]),
        ] {
            assert_eq!(
                p.choose(name, dtype, shape).unwrap(),
                Choice::Drop,
                "{name}"
            );
        }
    }

    #[test]
    fn sdcpp_names_for_diffusers_text_encoders() {
        let compat = Some(Compat::Sdcpp);
        for (name, want) in [
            (
                "conditioner.embedders.1.model.text_model.encoder.layers.0.self_attn.q_proj.weight",
                "conditioner.embedders.1.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
            ),
            (
                "conditioner.embedders.1.model.text_projection.weight",
                "conditioner.embedders.1.transformer.text_projection.weight",
            ),
            // Single-file names are sd.cpp's own.
            (
                "conditioner.embedders.1.model.text_projection",
                "conditioner.embedders.1.model.text_projection",
            ),
            (
                "conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight",
                "conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight",
            ),
        ] {
            assert_eq!(written_name(compat, name), want);
            assert_eq!(written_name(None, name), name);
        }
        let p = policy(GgmlType::Q8_0, compat, "");
        let sd2 = "cond_stage_model.model.text_model.encoder.layers.0.self_attn.q_proj.weight";
        let err = p.choose(sd2, DType::F16, &[1024, 1024]).unwrap_err();
        assert!(matches!(err, Error::BadRequest(_)), "{err}");
        let p = policy(GgmlType::Q8_0, None, "");
        assert_eq!(
            written(&p, sd2, DType::F16, &[1024, 1024]).0,
            GgmlType::Q8_0
        );
    }

    #[test]
    fn first_matching_rule_wins() {
        let p = policy(GgmlType::Q4_0, None, "attn1=q8_0, to_q=f16 ,^model\\.=q5_1");
        assert_eq!(
            written(&p, LINEAR, DType::F16, &[320, 320]).0,
            GgmlType::Q8_0
        );
        assert_eq!(
            written(&p, CONV, DType::F16, &[320, 320, 3, 3]).0,
            GgmlType::Q5_1
        );
        // Rules reach tensors the policy would keep float.
        assert_eq!(written(&p, NORM, DType::F32, &[320]).0, GgmlType::Q5_1);
    }

    #[test]
    fn rule_that_does_not_fit_names_the_tensor() {
        let p = policy(GgmlType::Q4_0, None, "in_layers=q4_K");
        let err = p
            .choose(CONV, DType::F16, &[320, 320, 3, 3])
            .unwrap_err()
            .to_string();
        assert!(err.contains(CONV) && err.contains("q4_K"), "{err}");
    }

    #[test]
    fn bad_rules_are_one_line_errors() {
        for (text, needle) in [
            ("attn=q9_0", "unknown type `q9_0`"),
            ("attn(=q8_0", "bad regex"),
            ("attn", "not `regex=type`"),
        ] {
            let err = parse_rules(text).unwrap_err();
            assert!(matches!(err, Error::BadRequest(_)));
            let msg = err.to_string();
            assert!(msg.contains(needle) && !msg.contains('\n'), "{msg}");
        }
        assert!(parse_rules("").unwrap().is_empty());
    }
}
