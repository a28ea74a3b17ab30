//! CLIP BPE tokenizer of the SD1.x text encoder (OpenAI CLIP ViT-L/14), written out by hand; the
//! OpenCLIP text encoders of SD2.x and SDXL use the same vocabulary and differ only in padding
//! ([`PadToken`]).
//!
//! Convention: we reproduce the Hugging Face *fast* tokenizer (NFC, lower-case, no ftfy, no HTML
//! unescaping), because since transformers 5 diffusers' `CLIPTokenizer` *is* that tokenizer, and the
//! golden `tokens.safetensors` came from it. So `&amp;` stays literal, where OpenAI's `SimpleTokenizer`
//! would turn it into `&`. Checked against HF `tokenizers` on 35 000 random strings: all equal but
//! one, whose combining mark only recent Unicode tables know (NFC then reorders it; HF's doesn't).
//!
//! Steps, as `tokenizer.json` spells them:
//! 1. the literal texts `<|startoftext|>` / `<|endoftext|>` become [`BOS`] / [`EOS`] (matched before
//!    any normalisation, so case-sensitive);
//! 2. the text between them is NFC-normalised and lower-cased one char at a time;
//! 3. it is split by CLIP's pattern into letter runs, single digits, contractions and runs of other
//!    symbols; whitespace falls out here, which makes the usual whitespace cleanup a no-op;
//! 4. each piece becomes UTF-8 bytes, each byte a vocabulary entry, the last one marked `</w>`
//!    (end of word), and BPE merges adjacent entries, lowest merge rank first.
//!
//! Data: `models/clip-merges.txt` is byte-identical to HF's `merges.txt` for CLIP: a `#version` line,
//! then the 48 894 merges OpenAI's `SimpleTokenizer` uses (lines 1..=48894 of
//! `bpe_simple_vocab_16e6.txt.gz`, MIT, see `models/clip-merges.LICENSE`). The vocabulary is derived
//! from it the way CLIP does, so no `vocab.json` ships: ids 0..256 are the byte characters, 256..512 the
//! same with `</w>`, then one id per merge (512 + rank), then `<|startoftext|>` and `<|endoftext|>`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::OnceLock;

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

/// `<|startoftext|>`, the first id of every sequence.
pub const BOS: u32 = 49406;
/// `<|endoftext|>`, the last id of every sequence; SD1.x also pads with it.
pub const EOS: u32 = 49407;
/// Number of token positions of the SD1.x text encoder.
pub const CONTEXT_LEN: usize = 77;

/// The pad token of a text encoder's tokenizer, as its diffusers `tokenizer_config.json` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PadToken {
    /// `<|endoftext|>` ([`EOS`]): CLIP ViT-L's tokenizer (SD1.x, SDXL's first text encoder).
    EndOfText,
    /// `"!"` (id 0): the OpenCLIP tokenizers (SD2.x, SDXL's second text encoder), whose original
    /// `open_clip.tokenize` zero-fills. diffusers registers `"!"` as a special token, so every `!`
    /// in the text also becomes id 0 (`"cat!"` → `cat`, 0 where open_clip gives `cat`, `!</w>`);
    /// we follow diffusers (huggingface/diffusers#4153).
    Exclamation,
}

impl PadToken {
    /// The id padding positions get.
    pub fn id(self) -> u32 {
        match self {
            PadToken::EndOfText => EOS,
            PadToken::Exclamation => 0,
        }
    }
}

const MERGES_TXT: &str = include_str!("../models/clip-merges.txt");
/// CLIP's vocabulary is 49 408 = 256 bytes × 2 + this many merges + 2 special tokens.
const MERGE_COUNT: usize = 49152 - 256 - 2;
/// Ids of merged tokens start after the 2 × 256 byte tokens.
const FIRST_MERGE_ID: u32 = 512;

/// CLIP's pre-tokenizer pattern, unchanged. Its special-token alternatives only see text that became
/// `<|endoftext|>` by lower-casing (e.g. `<|EndOfText|>`); HF then encodes it as plain text, and so
/// do we, but they decide where the neighbouring pieces end, so they stay.
const SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
const SPECIAL_PATTERN: &str = r"<\|startoftext\|>|<\|endoftext\|>";
/// With `"!"` as a special token ([`PadToken::Exclamation`]).
const SPECIAL_BANG_PATTERN: &str = r"<\|startoftext\|>|<\|endoftext\|>|!";

pub struct Tokenizer {
    /// Token text by id, in CLIP's byte-level form (`</w>` marks a word end).
    vocab: Vec<String>,
    /// Rank of the merge of two adjacent token ids; the merged token's id is `FIRST_MERGE_ID + rank`.
    merge_rank: HashMap<(u32, u32), u32>,
    /// Token id of each byte value inside a word; the word-final form is this + 256.
    byte_id: [u32; 256],
    split: Regex,
    special: Regex,
    special_bang: Regex,
}

impl Tokenizer {
    /// The SD1.x CLIP tokenizer, built from the embedded merges on first use and shared after.
    pub fn clip() -> &'static Tokenizer {
        static CLIP: OnceLock<Tokenizer> = OnceLock::new();
        CLIP.get_or_init(|| Tokenizer::from_merges(MERGES_TXT))
    }

    /// Builds the tables from a CLIP `merges.txt`. Panics on malformed data: the only caller passes
    /// the embedded file, which the tests check.
    fn from_merges(merges_txt: &str) -> Tokenizer {
        let byte_chars = bytes_to_unicode();
        let mut vocab: Vec<String> = Vec::with_capacity(FIRST_MERGE_ID as usize + MERGE_COUNT + 2);
        vocab.extend(byte_chars.iter().map(|&(_, c)| c.to_string()));
        vocab.extend(byte_chars.iter().map(|&(_, c)| format!("{c}</w>")));
        let mut byte_id = [0u32; 256];
        for (id, &(byte, _)) in byte_chars.iter().enumerate() {
            byte_id[byte as usize] = id as u32;
        }

        let mut id_of: HashMap<String, u32> = (0u32..)
            .zip(vocab.iter().cloned())
            .map(|(id, t)| (t, id))
            .collect();
        let mut merge_rank = HashMap::with_capacity(MERGE_COUNT);
        // The first line is the `#version` header.
        for (rank, line) in (0u32..).zip(merges_txt.lines().skip(1).take(MERGE_COUNT)) {
            let (left, right) = line.split_once(' ').expect("merge line is `left right`");
            let merged = format!("{left}{right}");
            let pair = (id_of[left], id_of[right]);
            let id = FIRST_MERGE_ID + rank;
            merge_rank.insert(pair, rank);
            id_of.insert(merged.clone(), id);
            vocab.push(merged);
        }
        assert_eq!(
            vocab.len(),
            BOS as usize,
            "merges file holds {MERGE_COUNT} merges"
        );
        vocab.push("<|startoftext|>".to_owned());
        vocab.push("<|endoftext|>".to_owned());

        Tokenizer {
            vocab,
            merge_rank,
            byte_id,
            split: Regex::new(SPLIT_PATTERN).expect("valid pattern"),
            special: Regex::new(SPECIAL_PATTERN).expect("valid pattern"),
            special_bang: Regex::new(SPECIAL_BANG_PATTERN).expect("valid pattern"),
        }
    }

    /// Token text by id (49 408 entries), in CLIP's byte-level form, as in HF's `vocab.json`.
    pub fn vocab(&self) -> &[String] {
        &self.vocab
    }

    /// Token ids of `text`, starting with [`BOS`] and ending with [`EOS`]; no padding, no truncation.
    /// Never fails: every byte sequence has a token. CLIP ViT-L's tokenizer (SD1.x).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_with(text, PadToken::EndOfText)
    }

    /// [`encode`](Self::encode) for the tokenizer whose pad token is `pad`: with
    /// [`PadToken::Exclamation`] every `!` is the special token 0.
    pub fn encode_with(&self, text: &str, pad: PadToken) -> Vec<u32> {
        let mut ids = vec![BOS];
        self.encode_into(text, &mut ids, pad);
        ids.push(EOS);
        ids
    }

    /// Token ids of `text` without [`BOS`] and [`EOS`] (HF's `add_special_tokens=False`), as A1111
    /// tokenizes each weighted piece of a prompt before it packs them into chunks.
    pub fn encode_words(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        self.encode_into(text, &mut ids, PadToken::EndOfText);
        ids
    }

    /// Id of a token given in its vocabulary form (`,</w>` is a comma ending a word).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        (0u32..)
            .zip(&self.vocab)
            .find(|(_, t)| *t == token)
            .map(|(id, _)| id)
    }

    /// Appends the ids of `text`, special-token texts included, without framing it; with
    /// [`PadToken::Exclamation`] every `!` is the pad token.
    fn encode_into(&self, text: &str, ids: &mut Vec<u32>, pad: PadToken) {
        let special = match pad {
            PadToken::EndOfText => &self.special,
            PadToken::Exclamation => &self.special_bang,
        };
        let mut start = 0;
        for found in special.find_iter(text) {
            self.encode_plain(&text[start..found.start()], ids);
            ids.push(match found.as_str() {
                "<|startoftext|>" => BOS,
                "<|endoftext|>" => EOS,
                _ => pad.id(),
            });
            start = found.end();
        }
        self.encode_plain(&text[start..], ids);
    }

    /// Ids for an SD1.x text encoder of `len` positions (77): [`BOS`], the tokens cut so that
    /// [`EOS`] still fits, [`EOS`], then [`EOS`] padding up to `len`. (A `len` below 2 cannot hold
    /// both; it gets the first `len` ids.)
    pub fn encode_padded(&self, text: &str, len: usize) -> Vec<u32> {
        self.encode_padded_with(text, len, PadToken::EndOfText)
    }

    /// [`encode_padded`](Self::encode_padded) for the tokenizer whose pad token is `pad`
    /// ([`encode_with`](Self::encode_with)), padded with `pad.id()`.
    pub fn encode_padded_with(&self, text: &str, len: usize, pad: PadToken) -> Vec<u32> {
        let mut ids = self.encode_with(text, pad);
        if len < 2 {
            ids.truncate(len);
            return ids;
        }
        if ids.len() > len {
            ids.truncate(len - 1);
            ids.push(EOS);
        }
        ids.resize(len, pad.id());
        ids
    }

    /// Tokens of `text` that an encoder of `len` positions does not read (0 when it all fits):
    /// [`encode_padded`](Self::encode_padded) keeps the first `len - 2` between BOS and EOS.
    pub fn dropped_tokens(&self, text: &str, len: usize) -> usize {
        self.encode(text).len().saturating_sub(len.max(2))
    }

    /// What an encoder of `len` positions reads of `text`: `text` itself when nothing is dropped,
    /// else the kept tokens decoded ([`decode`](Self::decode): lower case, CLIP's spacing; a word
    /// cut by the limit ends where the model's input ended).
    pub fn kept_text<'t>(&self, text: &'t str, len: usize) -> std::borrow::Cow<'t, str> {
        let ids = self.encode(text);
        if ids.len() <= len.max(2) {
            return text.into();
        }
        self.decode(&ids[1..len.max(2) - 1]).into()
    }

    /// Text of `ids` as HF's `CLIPTokenizer.decode` gives it: tokens joined, byte characters back to
    /// bytes (invalid UTF-8 replaced), each word end a space, trimmed. A leading BOS and trailing
    /// EOS ids are left out; special ids elsewhere become their literal text.
    pub fn decode(&self, ids: &[u32]) -> String {
        let byte_of: HashMap<char, u8> = bytes_to_unicode()
            .into_iter()
            .map(|(b, c)| (c, b))
            .collect();
        let ids = ids.strip_prefix(&[BOS]).unwrap_or(ids);
        let ids = ids.strip_suffix(&[EOS]).unwrap_or(ids);
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(token) = self.vocab.get(id as usize) else {
                continue;
            };
            if id >= BOS {
                bytes.extend_from_slice(token.as_bytes());
                continue;
            }
            let (body, word_end) = match token.strip_suffix("</w>") {
                Some(body) => (body, true),
                None => (token.as_str(), false),
            };
            bytes.extend(body.chars().filter_map(|c| byte_of.get(&c)));
            if word_end {
                bytes.push(b' ');
            }
        }
        String::from_utf8_lossy(&bytes).trim().to_string()
    }

    /// Appends the ids of text that holds no special token.
    fn encode_plain(&self, text: &str, ids: &mut Vec<u32>) {
        // Per char as HF does; `str::to_lowercase` would write a word-final Σ as ς.
        let normalized: String = text.nfc().flat_map(char::to_lowercase).collect();
        for piece in self.split.find_iter(&normalized) {
            // HF's byte-level step splits again with GPT-2's pattern; of CLIP's pieces that only
            // changes the special-token texts, into `<|`, the name and `|>`.
            match piece.as_str() {
                special @ ("<|startoftext|>" | "<|endoftext|>") => {
                    let name = &special[2..special.len() - 2];
                    for part in ["<|", name, "|>"] {
                        self.bpe(part, ids);
                    }
                }
                word => self.bpe(word, ids),
            }
        }
    }

    /// Byte-pair encodes one word: repeatedly merge the adjacent pair with the lowest merge rank,
    /// leftmost first, until no adjacent pair has a merge. This is the order of both CLIP's loop and
    /// HF's queue; the queue (used here, as in HF) keeps a long word O(n log n) where CLIP's loop is
    /// quadratic (seconds for a 100 kB word). No word cache: a run encodes only a couple of prompts.
    fn bpe(&self, word: &str, ids: &mut Vec<u32>) {
        let mut symbols: Vec<u32> = word.bytes().map(|b| self.byte_id[b as usize]).collect();
        let Some(last) = symbols.last_mut() else {
            return;
        };
        *last += 256; // the same byte as a word end (`</w>`)

        // The word as a linked list over `symbols`, so a merge is O(1): the left symbol takes the
        // merged id, the right one is unlinked.
        let len = symbols.len();
        let mut next: Vec<usize> = (1..=len).collect(); // `len` = no next
        let mut prev: Vec<Option<usize>> = (0..len).map(|i| i.checked_sub(1)).collect();
        let mut alive = vec![true; len];
        // Candidate merges as (rank, position of the left symbol), smallest first.
        let mut queue = BinaryHeap::new();
        let rank_at = |symbols: &[u32], next: &[usize], i: usize| {
            let j = *next.get(i)?;
            self.merge_rank
                .get(&(symbols[i], *symbols.get(j)?))
                .copied()
        };
        for i in 0..len {
            if let Some(rank) = rank_at(&symbols, &next, i) {
                queue.push(Reverse((rank, i)));
            }
        }

        while let Some(Reverse((rank, i))) = queue.pop() {
            // Skip candidates that an earlier merge used up or changed.
            if !alive[i] || rank_at(&symbols, &next, i) != Some(rank) {
                continue;
            }
            let right = next[i];
            symbols[i] = FIRST_MERGE_ID + rank;
            alive[right] = false;
            next[i] = next[right];
            if let Some(after) = next.get(i).and_then(|&j| prev.get_mut(j)) {
                *after = Some(i);
            }
            // The merged symbol may now merge with either neighbour.
            if let Some(left) = prev[i] {
                if let Some(rank) = rank_at(&symbols, &next, left) {
                    queue.push(Reverse((rank, left)));
                }
            }
            if let Some(rank) = rank_at(&symbols, &next, i) {
                queue.push(Reverse((rank, i)));
            }
        }
        ids.extend((0..len).filter(|&i| alive[i]).map(|i| symbols[i]));
    }
}

/// The one line to tell the user when the text encoder's 77 positions cut a prompt read with
/// `--prompt-syntax plain` (A1111 syntax reads any length in chunks): how many tokens of the prompt
/// and of the negative prompt (None when it is not used) were dropped. None when nothing was.
pub fn truncation_notice(prompt: &str, negative: Option<&str>) -> Option<String> {
    let clip = Tokenizer::clip();
    let prompt_dropped = clip.dropped_tokens(prompt, CONTEXT_LEN);
    let negative_dropped = negative.map_or(0, |n| clip.dropped_tokens(n, CONTEXT_LEN));
    if prompt_dropped == 0 && negative_dropped == 0 {
        return None;
    }
    Some(format!(
        "the text encoder reads {} tokens per prompt: {prompt_dropped} tokens of the prompt and \
         {negative_dropped} of the negative prompt were dropped (--prompt-syntax plain; a1111 reads \
         long prompts; the PNG's parameters hold the text that was used)",
        CONTEXT_LEN - 2
    ))
}

/// GPT-2/CLIP's byte ↔ character table, in vocabulary order: printable Latin-1 bytes stand for
/// themselves, the other 68 (space, controls …) get the chars from U+0100 on, so that no token
/// contains whitespace or a control character.
fn bytes_to_unicode() -> Vec<(u8, char)> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut table: Vec<(u8, char)> = (0..=255u8)
        .filter(|&b| printable(b))
        .map(|b| (b, char::from(b)))
        .collect();
    let others = (0..=255u8).filter(|&b| !printable(b));
    table.extend(
        others
            .zip(0x100u32..)
            .map(|(b, c)| (b, char::from_u32(c).expect("U+0100..=U+0143"))),
    );
    table
}
