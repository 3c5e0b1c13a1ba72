//! From a stream of token ids to a stream of text: incremental detokenization (never
//! splitting a UTF-8 character) and stop strings (text up to the first one, which is cut).
//!
//! Each new token decodes only a short window of ids (from the last settled token on, as
//! vLLM's and TGI's detokenizers do), so a reply costs time linear in its length, not
//! quadratic; decoding the window from a token before the new one keeps the spacing that a
//! decoder gives a token at the start of a text out of the middle of the reply.

use crate::engine::Tokenizer;

pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// The window decodes `ids[prefix..]`; `ids[prefix..read]` are already in `text`.
    prefix: usize,
    read: usize,
    /// The settled text of `ids[..read]`.
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    stop: &'a [String],
    /// Set when a stop string was found: the final text is settled.
    stopped: bool,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer, stop: &'a [String]) -> Self {
        TextStream {
            tokenizer,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
            text: String::new(),
            emitted: 0,
            stop,
            stopped: false,
        }
    }

    /// Adds a token; returns the text that can be handed out now. Text that could still
    /// become the start of a stop string is held back until it cannot.
    pub fn push(&mut self, id: u32) -> String {
        if self.stopped {
            return String::new();
        }
        self.ids.push(id);
        self.settle(false);
        self.emit(false)
    }

    /// Everything not yet handed out (at the end of generation).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        self.settle(true);
        self.emit(true)
    }

    /// Whether a stop string ended the text.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Moves the window's new text into `text` once it is whole: not ending in a
    /// replacement character (half of a multi-byte character), unless `force`.
    fn settle(&mut self, force: bool) {
        if self.read == self.ids.len() {
            return;
        }
        let decode = |ids: &[u32]| self.tokenizer.decode(ids, true).unwrap_or_default();
        let before = decode(&self.ids[self.prefix..self.read]);
        let now = decode(&self.ids[self.prefix..]);
        if !force && now.ends_with('\u{FFFD}') {
            return;
        }
        // A decoder may re-space the window's start: keep what extends the settled text.
        let new = now.strip_prefix(before.as_str()).unwrap_or_else(|| {
            let common = common_prefix_len(&before, &now);
            &now[common..]
        });
        self.text.push_str(new);
        self.prefix = self.read;
        self.read = self.ids.len();
    }

    /// The text that can be handed out: up to the first stop string (then stopped), else up
    /// to what could still begin one (everything when `all`).
    fn emit(&mut self, all: bool) -> String {
        let end = match self.first_stop() {
            Some(cut) => {
                self.stopped = true;
                cut
            }
            None if all => self.text.len(),
            None => self.text.len() - self.stop_prefix_len(),
        };
        if end <= self.emitted {
            return String::new();
        }
        let out = self.text[self.emitted..end].to_owned();
        self.emitted = end;
        out
    }

    /// Byte index where the first stop string starts, if any occurs; only text that could
    /// hold a new occurrence is searched.
    fn first_stop(&self) -> Option<usize> {
        let longest = self.stop.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.emitted.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|at| from + at))
            .min()
    }

    /// Length of the longest suffix of the text that is a proper prefix of a stop string.
    fn stop_prefix_len(&self) -> usize {
        let mut longest = 0;
        for s in self.stop {
            for (i, _) in s.char_indices().skip(1) {
                if self.text.ends_with(&s[..i]) {
                    longest = longest.max(i);
                }
            }
        }
        longest
    }
}

/// Bytes two strings share at their start, on a character boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::path::Path;

    fn tokenizer() -> Tokenizer {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models/tiny-smollm-tok/tokenizer.json");
        Tokenizer::from_file(&path).unwrap()
    }

    /// Streamed pieces add up to the whole reply decoded at once, for texts with multi-byte
    /// characters, and for random ids (byte tokens that split characters included).
    #[test]
    fn pieces_add_up_to_the_whole_decode() {
        let tok = tokenizer();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut cases: Vec<Vec<u32>> = [
            "Hello world, this is a test.",
            "Grüße aus Köln — 東京 🎉 and emoji 👩‍👩‍👧 too",
            "  leading spaces\n\nand\ttabs ",
        ]
        .iter()
        .map(|t| tok.encode_plain(t).unwrap())
        .collect();
        cases.extend((0..50).map(|_| (0..40).map(|_| rng.random_range(0..49152)).collect()));
        for ids in cases {
            let mut stream = TextStream::new(&tok, &[]);
            let mut text: String = ids.iter().map(|&id| stream.push(id)).collect();
            text += &stream.finish();
            assert_eq!(text, tok.decode(&ids, true).unwrap(), "{ids:?}");
        }
    }

    /// Stop strings cut the text before them, also when one spans several tokens, and text
    /// that might begin one is held back, not lost.
    #[test]
    fn stop_strings_cut_and_hold_back() {
        let tok = tokenizer();
        let ids = tok
            .encode_plain("The capital of France is Paris. The end.")
            .unwrap();
        let stop = vec!["Paris.".to_owned(), "xyz".to_owned()];
        let mut stream = TextStream::new(&tok, &stop);
        let mut text = String::new();
        for &id in &ids {
            text += &stream.push(id);
            if stream.stopped() {
                break;
            }
        }
        assert!(stream.stopped());
        assert_eq!(text, "The capital of France is ");
        let stop = vec!["France was".to_owned()];
        let mut stream = TextStream::new(&tok, &stop);
        let mut text: String = ids.iter().map(|&id| stream.push(id)).collect();
        text += &stream.finish();
        assert!(!stream.stopped());
        assert_eq!(text, tok.decode(&ids, true).unwrap());
    }
}
