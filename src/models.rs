//! The networks of one model, built from its family's description over one mapped store. The
//! pipeline runs them; the governor plans them from their shapes (it never imports the pipeline).

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::family::{ModelSpec, Prediction};
use crate::job::Job;
use crate::nn::clip::TextEncoder;
use crate::nn::taesd::Taesd;
use crate::nn::unet::UNet;
use crate::nn::vae::{Decoder, Encoder};
use crate::weights::{self, PredictionSource, TensorStore, Weights};

/// `conv_in` input channels of an inpainting UNet: 4 latent, 1 mask, 4 masked-image latent.
pub const INPAINT_CHANNELS: usize = 9;

pub struct Models {
    /// The family's description (prefixes, encoders, conditioning, scaling).
    pub spec: &'static ModelSpec,
    /// What the UNet predicts, and who said so (`--prediction`, the file, the weights, the family).
    pub prediction: Prediction,
    pub prediction_source: PredictionSource,
    /// One per `spec.text_encoders`, in the same order.
    pub text_encoders: Vec<TextEncoder>,
    pub unet: UNet,
    pub decoder: Decoder,
    /// The VAE encoder (img2img, inpaint), when the weights have one; a job with an init image
    /// refuses to load without it.
    pub encoder: Option<Encoder>,
    /// A 9-channel inpainting UNet (`conv_in` takes latent, mask and masked-image latent: SD1.5-,
    /// SD2- and SDXL-inpainting alike), detected from `conv_in`'s input channels.
    pub inpaint_unet: bool,
    /// `--taesd`: the tiny autoencoder (final decode unless `--taesd-preview-only`, previews,
    /// img2img's encode), checked against the VAE's latent channels and scale.
    pub taesd: Option<Taesd>,
    /// The mapped weights (the governor moves their pages).
    pub store: Arc<TensorStore>,
}

impl Models {
    /// Opens the model (file or diffusers folder), optionally replacing its VAE, names its family
    /// and checks that it has every tensor the family's networks need.
    pub fn load(job: &Job) -> Result<Self> {
        // The small file first: a bad `--taesd` is refused before the model is mapped.
        let taesd = job.taesd.as_deref().map(Taesd::open).transpose()?;
        let mut store = TensorStore::open(&job.model)?;
        if let Some(vae) = &job.vae {
            store = store.with_vae(vae)?;
        }
        let family = weights::detect_family(&store)?;
        let spec = family.spec();
        let (prediction, prediction_source) = match job.prediction {
            Some(p) => (p, PredictionSource::Flag),
            None => weights::detect_prediction(&store, family),
        };
        let store = Arc::new(store);
        let text_encoders = spec
            .text_encoders
            .iter()
            .map(|e| {
                TextEncoder::with_activation(&Weights::new(store.clone(), e.prefix), e.activation)
            })
            .collect::<Result<Vec<_>>>()?;
        let unet_prefix = spec.unet_prefix.trim_end_matches('.');
        // `detect_family` found `conv_in`; its output width is the UNet's base width.
        let model_channels = store
            .get(&format!("{unet_prefix}.input_blocks.0.0.weight"))
            .map_or(0, |t| t.shape[0]);
        let heads = spec.unet_heads(model_channels);
        let vae_prefix = spec.vae_prefix.trim_end_matches('.');
        let vae = Weights::new(store.clone(), vae_prefix);
        let encoder = if vae.contains("encoder.conv_in.weight") {
            Some(Encoder::new(&vae)?)
        } else if job.init_image.is_some() {
            return Err(Error::UnsupportedModel(
                "this model's VAE has no encoder, which an init image needs".into(),
            ));
        } else {
            None
        };
        let unet = UNet::new(&Weights::new(store.clone(), unet_prefix), heads)?;
        let inpaint_unet = unet.in_channels() == INPAINT_CHANNELS;
        let decoder = Decoder::new(&vae)?;
        if let Some(t) = &taesd {
            let (c, f) = (decoder.latent_channels(), decoder.upscale());
            if t.latent_channels() != c || t.factor() != f {
                return Err(Error::bad_file(
                    &t.path,
                    format!(
                        "a TAESD for {}-channel latents at 1/{} scale; this {} model's are {c}-channel at 1/{f} \
                         (SD1/SD2 take taesd, SDXL taesdxl)",
                        t.latent_channels(),
                        t.factor(),
                        spec.name
                    ),
                ));
            }
        }
        Ok(Models {
            spec,
            prediction,
            prediction_source,
            text_encoders,
            unet,
            decoder,
            encoder,
            inpaint_unet,
            taesd,
            store,
        })
    }
}

impl Models {
    /// Channels of the latent the sampler works on (4): the UNet's output, whatever its input.
    pub fn latent_channels(&self) -> usize {
        self.unet.out_channels()
    }
}
