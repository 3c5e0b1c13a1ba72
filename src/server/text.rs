//! From a stream of token ids to a stream of text: incremental detokenization (never
//! splitting a UTF-8 character) and stop strings (text up to the first one, which is cut).

use crate::engine::Tokenizer;

pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// Text of `ids` already handed out.
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
        let text = self.decoded();
        if let Some(cut) = self.first_stop(&text) {
            self.stopped = true;
            return self.emit_to(&text, cut);
        }
        // A trailing replacement character may be half of a multi-byte character.
        let settled = text.trim_end_matches('\u{FFFD}');
        let safe = settled.len() - self.stop_prefix_len(settled);
        self.emit_to(&text, safe)
    }

    /// Everything not yet handed out (at the end of generation).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let text = self.decoded();
        let end = text.len();
        self.emit_to(&text, end)
    }

    /// Whether a stop string ended the text.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    fn decoded(&self) -> String {
        self.tokenizer.decode(&self.ids, true).unwrap_or_default()
    }

    fn emit_to(&mut self, text: &str, end: usize) -> String {
        // A tokenizer may re-space earlier text as tokens arrive: emit only clean pieces.
        let Some(piece) = text.get(self.emitted..end) else {
            return String::new();
        };
        let out = piece.to_owned();
        self.emitted = end;
        out
    }

    /// Byte index where the first stop string starts, if any occurs.
    fn first_stop(&self, text: &str) -> Option<usize> {
        self.stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()))
            .min()
    }

    /// Length of the longest suffix of `text` that is a proper prefix of a stop string.
    fn stop_prefix_len(&self, text: &str) -> usize {
        let mut longest = 0;
        for s in self.stop {
            for (i, _) in s.char_indices().skip(1) {
                if text.ends_with(&s[..i]) {
                    longest = longest.max(i);
                }
            }
        }
        longest
    }
}
