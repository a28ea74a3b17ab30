//! A1111's extra-network tags (`modules/extra_networks.py`): every `<type:arg:arg…>` is cut out of
//! the prompt before it is parsed; `lora` tags (and `lyco`, A1111's alias for them) name a LoRA
//! and its multipliers as the built-in Lora extension reads them:
//! `<lora:NAME>` = 1.0, `<lora:NAME:M>` = M for text encoder and UNet, `<lora:NAME:TE:UNET>`,
//! and the named forms `te=M` / `unet=M`, which win over positional ones.

use std::sync::OnceLock;

use regex::Regex;

use crate::{Error, Result};

/// One `<lora:…>` tag.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraTag {
    /// As written: the LoRA's file name without its extension.
    pub name: String,
    /// Multiplier of the LoRA's text-encoder deltas.
    pub te_multiplier: f32,
    /// Multiplier of the LoRA's UNet deltas.
    pub unet_multiplier: f32,
}

/// The tags taken out of a prompt, in prompt order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExtraNetworks {
    pub loras: Vec<LoraTag>,
    /// Whole tags of other kinds (`<hypernet:x:1>` …): removed from the text as A1111 does, left
    /// to the caller to report, since sdcap has no such networks.
    pub other: Vec<String>,
}

fn tag_pattern() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"<(\w+):([^>]+)>").expect("valid pattern"))
}

/// The prompt with every extra-network tag removed (nothing else changes: the spaces around a tag
/// stay, as in A1111), and the tags. Fails on a `lora` tag without a name or with a multiplier that
/// is not a finite number.
pub fn extract_extra_networks(prompt: &str) -> Result<(String, ExtraNetworks)> {
    let mut found = ExtraNetworks::default();
    for m in tag_pattern().captures_iter(prompt) {
        match &m[1] {
            "lora" | "lyco" => found.loras.push(lora_tag(&m[0], &m[2])?),
            _ => found.other.push(m[0].to_owned()),
        }
    }
    let text = tag_pattern().replace_all(prompt, "").into_owned();
    Ok((text, found))
}

/// Reads the arguments as `extra_networks.ExtraNetworkParams` splits them (at `:`; an item with
/// exactly one `=` is named) and the Lora extension interprets them.
fn lora_tag(tag: &str, args: &str) -> Result<LoraTag> {
    let mut positional = Vec::new();
    let (mut te_named, mut unet_named) = (None, None);
    for item in args.split(':') {
        match item.split_once('=') {
            Some((key, value)) if !value.contains('=') => match key {
                "te" => te_named = Some(value),
                "unet" => unet_named = Some(value),
                _ => {} // `dyn=` and unknown keys: A1111 reads them or not; they carry no weight.
            },
            _ => positional.push(item),
        }
    }
    let number = |text: &str| -> Result<f32> {
        // Python's float() allows surrounding spaces; `inf`/`nan` would only ruin the image.
        match text.trim().parse::<f32>() {
            Ok(value) if value.is_finite() => Ok(value),
            _ => Err(Error::BadRequest(format!(
                "prompt: `{tag}`: the multiplier `{text}` is not a number (write e.g. `<lora:name:0.8>`)"
            ))),
        }
    };
    let name = positional.first().ok_or_else(|| {
        Error::BadRequest(format!(
            "prompt: `{tag}` names no LoRA (write `<lora:NAME:WEIGHT>`)"
        ))
    })?;
    let mut te_multiplier = positional.get(1).map_or(Ok(1.0), |m| number(m))?;
    if let Some(m) = te_named {
        te_multiplier = number(m)?;
    }
    let mut unet_multiplier = positional.get(2).map_or(Ok(te_multiplier), |m| number(m))?;
    if let Some(m) = unet_named {
        unet_multiplier = number(m)?;
    }
    Ok(LoraTag {
        name: (*name).to_owned(),
        te_multiplier,
        unet_multiplier,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lora(name: &str, te: f32, unet: f32) -> LoraTag {
        LoraTag {
            name: name.to_owned(),
            te_multiplier: te,
            unet_multiplier: unet,
        }
    }

    #[test]
    fn tags_are_cut_out_and_read() {
        let (text, found) =
            extract_extra_networks("a castle <lora:pixel_art:0.8>, (sunset:1.3), [blurry]")
                .unwrap();
        assert_eq!(text, "a castle , (sunset:1.3), [blurry]");
        assert_eq!(found.loras, [lora("pixel_art", 0.8, 0.8)]);
        assert!(found.other.is_empty());
    }

    #[test]
    fn multiplier_forms() {
        let (text, found) = extract_extra_networks(
            "<lora:a><lora:b:0.5:0.25> x <lyco:c:2> <lora:d:te=0.3:unet=-1> <lora:e:0.7:te=0.1> <lora:f: 0.5 :dyn=4>",
        )
        .unwrap();
        assert_eq!(text, " x    ");
        assert_eq!(
            found.loras,
            [
                lora("a", 1.0, 1.0),
                lora("b", 0.5, 0.25),
                lora("c", 2.0, 2.0),
                lora("d", 0.3, -1.0),
                // A named `te` wins over the positional one, and the UNet follows it.
                lora("e", 0.1, 0.1),
                lora("f", 0.5, 0.5),
            ]
        );
    }

    #[test]
    fn other_networks_are_removed_and_returned() {
        let (text, found) = extract_extra_networks("a <hypernet:h:1> b <lora:x:1>").unwrap();
        assert_eq!(text, "a  b ");
        assert_eq!(found.other, ["<hypernet:h:1>"]);
        assert_eq!(found.loras, [lora("x", 1.0, 1.0)]);
    }

    #[test]
    fn what_is_not_a_tag_stays() {
        for prompt in ["<lora>", "<lora:>", "a < b > c", "<lo ra:x:1>", "<:x:1>"] {
            let (text, found) = extract_extra_networks(prompt).unwrap();
            assert_eq!(text, prompt);
            assert_eq!(found, ExtraNetworks::default());
        }
    }

    #[test]
    fn bad_multipliers_are_errors() {
        for prompt in [
            "<lora:x:abc>",
            "<lora:x:1:nan>",
            "<lora:x:inf>",
            "<lora:x:te=>",
            "<lora:te=1>",
        ] {
            let err = extract_extra_networks(prompt).unwrap_err();
            assert!(matches!(err, Error::BadRequest(_)), "{prompt}: {err}");
            assert!(err.to_string().starts_with("prompt: `<lora:"), "{err}");
        }
    }
}
