//! A1111's emphasis syntax (`modules/prompt_parser.py`, `parse_prompt_attention`), step for step, so
//! that a pasted prompt gets the weights it gets there, float for float:
//!
//! * `(text)` multiplies the weight of `text` by 1.1, `[text]` by 1/1.1, `(text:1.5)` by 1.5;
//!   nesting multiplies (`((a))` = 1.1 · 1.1);
//! * `\(` `\)` `\[` `\]` `\\` are the literal characters; a backslash before anything else vanishes;
//! * a bracket left open applies to the end of the prompt, a closing bracket with nothing open is text;
//! * `BREAK` (a whole word, upper case) ends the chunk (see `chunks`);
//! * adjacent pieces of equal weight are merged.

use std::sync::OnceLock;

use regex::Regex;

use crate::{Error, Result};

/// One piece of a parsed prompt.
#[derive(Clone, Debug, PartialEq)]
pub enum Segment {
    /// Text whose tokens all get `weight` (in f64, as A1111 multiplies Python floats).
    Text { text: String, weight: f64 },
    /// `BREAK`: the tokens after it start a new chunk.
    Break,
}

const ROUND_MULTIPLIER: f64 = 1.1;
const SQUARE_MULTIPLIER: f64 = 1.0 / 1.1;
/// How A1111 marks a `BREAK` in its list: this text with this weight. A `BREAK` inside brackets has
/// its weight multiplied like any piece and then is no longer a break but the word, weighted; we keep
/// that quirk, so that such a prompt gives the tokens it gives there.
const BREAK_TEXT: &str = "BREAK";
const BREAK_WEIGHT: f64 = -1.0;

/// A1111's `re_attention`, alternative for alternative (the regex crate, like Python's `re`, takes
/// the first alternative that matches). Digits of a weight are ASCII here; Python would also accept
/// other scripts' digits.
fn attention_pattern() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(concat!(
            r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|",
            r"\(|\[|",
            r":\s*([+-]?[.0-9]+)\s*\)|",
            r"\)|\]|",
            r"[^\\()\[\]:]+|",
            r":",
        ))
        .expect("valid pattern")
    })
}

fn break_pattern() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"(?s)\s*\bBREAK\b\s*").expect("valid pattern"))
}

/// The weighted pieces of `prompt`, as A1111 parses them (its `parse_prompt_attention`). An empty
/// prompt is one empty piece of weight 1. Fails only on a weight that is no number, such as
/// `(a:1.2.3)` (where A1111 fails too).
pub fn parse_attention(prompt: &str) -> Result<Vec<Segment>> {
    let mut pieces: Vec<(String, f64)> = Vec::new();
    // Where the pieces inside each open bracket start.
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |pieces: &mut [(String, f64)], start: usize, by: f64| {
        pieces[start..].iter_mut().for_each(|p| p.1 *= by);
    };

    for m in attention_pattern().captures_iter(prompt) {
        let token = &m[0];
        if let Some(literal) = token.strip_prefix('\\') {
            pieces.push((literal.to_owned(), 1.0));
        } else if token == "(" {
            round.push(pieces.len());
        } else if token == "[" {
            square.push(pieces.len());
        } else if let (Some(weight), Some(start)) = (m.get(1), round.last().copied()) {
            round.pop();
            let weight: f64 = weight.as_str().parse().map_err(|_| {
                Error::BadRequest(format!(
                    "prompt: the weight in `{token}` is not a number (write e.g. `(word:1.2)`)"
                ))
            })?;
            multiply(&mut pieces, start, weight);
        } else if token == ")" && !round.is_empty() {
            let start = round.pop().unwrap_or_default();
            multiply(&mut pieces, start, ROUND_MULTIPLIER);
        } else if token == "]" && !square.is_empty() {
            let start = square.pop().unwrap_or_default();
            multiply(&mut pieces, start, SQUARE_MULTIPLIER);
        } else {
            for (i, part) in break_pattern().split(token).enumerate() {
                if i > 0 {
                    pieces.push((BREAK_TEXT.to_owned(), BREAK_WEIGHT));
                }
                pieces.push((part.to_owned(), 1.0));
            }
        }
    }
    // Unclosed brackets reach to the end, applied from the outermost in, as A1111 does.
    for &start in &round {
        multiply(&mut pieces, start, ROUND_MULTIPLIER);
    }
    for &start in &square {
        multiply(&mut pieces, start, SQUARE_MULTIPLIER);
    }
    if pieces.is_empty() {
        pieces.push((String::new(), 1.0));
    }

    let mut merged: Vec<(String, f64)> = Vec::with_capacity(pieces.len());
    for (text, weight) in pieces {
        match merged.last_mut() {
            Some(last) if last.1 == weight => last.0.push_str(&text),
            _ => merged.push((text, weight)),
        }
    }
    Ok(merged
        .into_iter()
        .map(|(text, weight)| {
            if text == BREAK_TEXT && weight == BREAK_WEIGHT {
                Segment::Break
            } else {
                Segment::Text { text, weight }
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(text: &str, weight: f64) -> Segment {
        Segment::Text {
            text: text.to_owned(),
            weight,
        }
    }

    fn parse(prompt: &str) -> Vec<Segment> {
        parse_attention(prompt).unwrap()
    }

    /// The examples of A1111's docstring, with its printed floats.
    #[test]
    fn a1111_doctests() {
        assert_eq!(parse("normal text"), [text("normal text", 1.0)]);
        assert_eq!(
            parse("an (important) word"),
            [text("an ", 1.0), text("important", 1.1), text(" word", 1.0)]
        );
        assert_eq!(parse("(unbalanced"), [text("unbalanced", 1.1)]);
        assert_eq!(parse(r"\(literal\]"), [text("(literal]", 1.0)]);
        assert_eq!(
            parse("(unnecessary)(parens)"),
            [text("unnecessaryparens", 1.1)]
        );
        assert_eq!(
            parse("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            [
                text("a ", 1.0),
                text("house", 1.5730000000000004),
                text(" ", 1.1),
                text("on", 1.0),
                text(" a ", 1.1),
                text("hill", 0.55),
                text(", sun, ", 1.1),
                text("sky", 1.4641000000000006),
                text(".", 1.1),
            ]
        );
    }

    #[test]
    fn weights_nest_and_square_brackets_divide() {
        assert_eq!(parse("((a))"), [text("a", 1.1 * 1.1)]);
        assert_eq!(parse("[a]"), [text("a", 1.0 / 1.1)]);
        assert_eq!(parse("[[a]]"), [text("a", (1.0 / 1.1) * (1.0 / 1.1))]);
        assert_eq!(parse("[(a)]"), [text("a", 1.1 * (1.0 / 1.1))]);
        assert_eq!(parse("(a:0.5)"), [text("a", 0.5)]);
        assert_eq!(parse("(a: 1.5 )"), [text("a", 1.5)]);
        assert_eq!(parse("(a:+.5)"), [text("a", 0.5)]);
        assert_eq!(parse("(a:-1)"), [text("a", -1.0)]);
        assert_eq!(parse("(a:2.)"), [text("a", 2.0)]);
        assert_eq!(parse("((a:1.5))"), [text("a", 1.5 * 1.1)]);
    }

    /// Exponents are not in A1111's number pattern: `:1e2` is text and the `)` a plain 1.1.
    #[test]
    fn numbers_outside_the_pattern_are_text() {
        assert_eq!(parse("(a:1e2)"), [text("a:1e2", 1.1)]);
        assert_eq!(parse("a:1.5) b"), [text("a:1.5) b", 1.0)]);
        assert_eq!(parse("(a:b)"), [text("a:b", 1.1)]);
        assert_eq!(parse("time: 12:30"), [text("time: 12:30", 1.0)]);
    }

    #[test]
    fn a_weight_that_is_no_number_is_an_error() {
        for prompt in ["(a:1.2.3)", "(a:.)", "(a:..5)"] {
            let err = parse_attention(prompt).unwrap_err();
            assert!(matches!(err, Error::BadRequest(_)), "{prompt}: {err}");
            assert!(err.to_string().contains("not a number"), "{err}");
        }
    }

    #[test]
    fn unbalanced_brackets() {
        assert_eq!(parse("a) b] c"), [text("a) b] c", 1.0)]);
        // Unclosed: outermost first, so `b` is 1.1 × 1.1 and `[c` divides c.
        assert_eq!(
            parse("(a (b [c"),
            [
                text("a ", 1.1),
                text("b ", 1.1 * 1.1),
                text("c", 1.1 * 1.1 * (1.0 / 1.1)),
            ]
        );
        // A `]` does not close a `(`: it is text inside it.
        assert_eq!(parse("(a]b)"), [text("a]b", 1.1)]);
        assert_eq!(parse("()"), [text("", 1.0)]);
        assert_eq!(parse(""), [text("", 1.0)]);
    }

    #[test]
    fn escapes() {
        assert_eq!(parse(r"\(a\) \[b\]"), [text("(a) [b]", 1.0)]);
        assert_eq!(parse(r"a\\b"), [text(r"a\b", 1.0)]);
        // A backslash before an ordinary character vanishes (A1111 appends the empty rest).
        assert_eq!(parse(r"a\nb"), [text("anb", 1.0)]);
        assert_eq!(parse(r"(\(a\))"), [text("(a)", 1.1)]);
        // There is no escaped colon: `\:` is a lone backslash (gone), then `:2)` sets the weight.
        assert_eq!(parse(r"(a\:2)"), [text("a", 2.0)]);
    }

    #[test]
    fn breaks() {
        assert_eq!(
            parse("a BREAK b"),
            [text("a", 1.0), Segment::Break, text("b", 1.0)]
        );
        assert_eq!(
            parse("a\n BREAK\tBREAK b"),
            [
                text("a", 1.0),
                Segment::Break,
                text("", 1.0),
                Segment::Break,
                text("b", 1.0)
            ]
        );
        // Not a whole upper-case word: plain text.
        assert_eq!(
            parse("BREAKS break xBREAK"),
            [text("BREAKS break xBREAK", 1.0)]
        );
        // The pieces around a break keep their weights; the break sits between two empty pieces.
        assert_eq!(
            parse("(a) BREAK (b)"),
            [
                text("a", 1.1),
                text("", 1.0),
                Segment::Break,
                text("", 1.0),
                text("b", 1.1)
            ]
        );
        // Inside brackets, A1111 multiplies the marker's weight too: it becomes the word, weighted.
        assert_eq!(
            parse("(a BREAK b)"),
            [text("a", 1.1), text("BREAK", -1.1), text("b", 1.1)]
        );
    }
}
