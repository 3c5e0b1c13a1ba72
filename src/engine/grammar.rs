//! Constrained decoding: JSON schemas, regular expressions and EBNF grammars turned into
//! the set of tokens allowed at each step, by llguidance (the engine llama.cpp and vLLM use)
//! against this model's vocabulary.
//!
//! A [`Grammars`] is built once per server from the tokenizer; each request compiles its
//! [`GrammarSpec`] into a [`Constraint`] before it is queued (a bad schema is the client's
//! error, found before any work). The scheduler asks a constraint for its allowed tokens
//! before a step and tells it the chosen token after; the request ends when the grammar is
//! complete.

use super::Tokenizer;
use anyhow::{anyhow, bail, Result};
use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{InferenceCapabilities, SimpleVob, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use std::sync::Arc;

/// What a request constrains its output to.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// A JSON value matching this schema (OpenAI's `json_schema`; `{"type": "object"}` for
    /// `json_object`).
    JsonSchema(Value),
    /// Text matching this regular expression (Rust `regex` syntax), whole.
    Regex(String),
    /// Text derived from this grammar's `root` rule (GBNF-style EBNF, as SGLang's `ebnf`:
    /// `root ::= expr`, strings in quotes, `[a-z]` classes, `* + ?`, `{m,n}`).
    Ebnf(String),
    /// `before`, then a JSON value matching `schema`, then `after` (a tool call in its
    /// tags).
    TaggedJson {
        before: String,
        schema: Value,
        after: String,
    },
}

impl GrammarSpec {
    /// What the client gave, in words (for errors).
    pub fn kind(&self) -> &'static str {
        match self {
            GrammarSpec::JsonSchema(_) => "JSON schema",
            GrammarSpec::Regex(_) => "regex",
            GrammarSpec::Ebnf(_) => "EBNF grammar",
            GrammarSpec::TaggedJson { .. } => "tool schema",
        }
    }
}

/// Compiles grammars for one model's vocabulary.
pub struct Grammars {
    factory: ParserFactory,
}

/// Lexer work allowed when compiling one grammar (llguidance measures ~50k per ms), so a
/// hostile schema is refused in tens of milliseconds instead of stalling a thread.
const COMPILE_FUEL: u64 = 2_000_000;

/// Symbols a compiled grammar may hold (a schema of a few hundred kilobytes).
const MAX_GRAMMAR_SYMBOLS: usize = 200_000;

impl Grammars {
    /// The compiler for a model whose logits have `vocab_size` entries; `eos_ids` (the
    /// tokens that end a turn) are allowed exactly where the grammar may end.
    pub fn new(tokenizer: &Tokenizer, vocab_size: usize, eos_ids: &[u32]) -> Result<Self> {
        Self::from_vocabulary(tokenizer.token_bytes()?, vocab_size, eos_ids)
    }

    /// The compiler for a vocabulary given as each token's bytes (special tokens start with
    /// 0xFF); ids from `words.len()` to `vocab_size` are never allowed.
    pub fn from_vocabulary(
        mut words: Vec<Vec<u8>>,
        vocab_size: usize,
        eos_ids: &[u32],
    ) -> Result<Self> {
        if words.len() > vocab_size {
            bail!(
                "the tokenizer has {} tokens, more than the model's {vocab_size} logits",
                words.len()
            );
        }
        // Padding rows of the embedding are tokens no text ever produces.
        words.resize(vocab_size, Vec::new());
        let eos = *eos_ids
            .first()
            .ok_or_else(|| anyhow!("constrained decoding needs an end-of-sequence token"))?;
        let info = TokRxInfo::new(vocab_size as u32, eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos_ids);
        let env: llguidance::toktrie::TokEnv = Arc::new(Vocabulary { trie });
        let mut factory = ParserFactory::new(
            &env,
            InferenceCapabilities::default(),
            &llguidance::earley::SlicedBiasComputer::general_slices(),
        )?;
        factory.quiet();
        *factory.limits_mut() = ParserLimits {
            initial_lexer_fuel: COMPILE_FUEL,
            max_grammar_size: MAX_GRAMMAR_SYMBOLS,
            verbose_errors: false,
            ..ParserLimits::default()
        };
        Ok(Grammars { factory })
    }

    /// Compiles `spec`; the error says what is wrong with it.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Constraint> {
        let grammar = match spec {
            GrammarSpec::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(compact_json(schema)?)
            }
            GrammarSpec::Regex(rx) => {
                check_regex(rx)?;
                TopLevelGrammar::from_regex(rx)
            }
            GrammarSpec::Ebnf(text) => TopLevelGrammar::from_lark(ebnf_to_lark(text)?),
            GrammarSpec::TaggedJson {
                before,
                schema,
                after,
            } => TopLevelGrammar::from_lark(format!(
                "start: {} %json {} {}",
                Value::from(before.as_str()),
                compact_json(schema)?,
                Value::from(after.as_str())
            )),
        };
        let parser = self.factory.create_parser(grammar)?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            bail!("{e}");
        }
        Ok(Constraint {
            matcher: Box::new(matcher),
            mask: None,
        })
    }
}

/// The vocabulary as llguidance sees it: each token's bytes (special tokens marked).
struct Vocabulary {
    trie: TokTrie,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// Forced text is tokenized greedily (only used to skip ahead, never for prompts).
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.trie.greedy_tokenize(s)
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// JSON without free whitespace (`{"a": 1, "b": [2, 3]}`): a sampled reply cannot wander
/// into endless spaces and newlines, nor numbers into endless digits ([`bound_numbers`]).
/// Objects that list their properties get no others
/// unless the schema says `additionalProperties` (xgrammar's strict mode, which SGLang and
/// vLLM use): a reply that validates this way validates against the schema as written.
/// A schema's own `x-guidance` options win.
fn compact_json(schema: &Value) -> Result<Value> {
    let Value::Object(_) = schema else {
        if let Value::Bool(_) = schema {
            return Ok(schema.clone());
        }
        bail!("a JSON schema must be an object (or true / false)");
    };
    let mut schema = schema.clone();
    strict_objects(&mut schema, 0);
    let Value::Object(mut map) = schema else {
        unreachable!("checked above")
    };
    let options = map.entry("x-guidance").or_insert_with(|| json!({}));
    if let Value::Object(o) = options {
        for (k, v) in [
            ("whitespace_flexible", json!(false)),
            ("item_separator", json!(", ")),
            ("key_separator", json!(": ")),
        ] {
            o.entry(k).or_insert(v);
        }
    }
    Ok(Value::Object(map))
}

/// Largest magnitude a JSON number takes unless its schema says otherwise (f64 holds every
/// integer up to it exactly).
const NUMBER_LIMIT: f64 = 1e15;

/// Numbers without bounds or a step get sane ones: within ±[`NUMBER_LIMIT`], at most ten
/// decimals. Otherwise a reply sampled at temperature 1 can run into endless digits (the
/// grammar allows them) and never end; replies inside these limits still validate against
/// the schema as written.
fn bound_numbers(map: &mut serde_json::Map<String, Value>) {
    let is_number = match map.get("type").and_then(Value::as_str) {
        Some("number") => true,
        Some("integer") => false,
        _ => return,
    };
    let value = |key: &str| map.get(key).and_then(Value::as_f64);
    let cap_max = !map.contains_key("maximum")
        && !map.contains_key("exclusiveMaximum")
        && value("minimum").is_none_or(|v| v < NUMBER_LIMIT)
        && value("exclusiveMinimum").is_none_or(|v| v < NUMBER_LIMIT);
    let cap_min = !map.contains_key("minimum")
        && !map.contains_key("exclusiveMinimum")
        && value("maximum").is_none_or(|v| v > -NUMBER_LIMIT)
        && value("exclusiveMaximum").is_none_or(|v| v > -NUMBER_LIMIT);
    let cap_decimals = is_number && !map.contains_key("multipleOf");
    if cap_max {
        map.insert("maximum".into(), json!(NUMBER_LIMIT));
    }
    if cap_min {
        map.insert("minimum".into(), json!(-NUMBER_LIMIT));
    }
    if cap_decimals {
        map.insert("multipleOf".into(), json!(1e-10));
    }
}

/// Adds `"additionalProperties": false` to every subschema with `properties` and no word on
/// other properties, following the keywords that hold subschemas (depth-limited: JSON
/// bodies nest at most 128 deep anyway).
fn strict_objects(schema: &mut Value, depth: usize) {
    let Value::Object(map) = schema else { return };
    if depth > 256 {
        return;
    }
    if map.get("properties").is_some_and(Value::is_object) {
        map.entry("additionalProperties").or_insert(json!(false));
    }
    bound_numbers(map);
    for (key, value) in map.iter_mut() {
        match key.as_str() {
            "properties" | "patternProperties" | "$defs" | "definitions" | "dependentSchemas" => {
                if let Value::Object(subs) = value {
                    for sub in subs.values_mut() {
                        strict_objects(sub, depth + 1);
                    }
                }
            }
            // Not allOf: parts that each forbid the others' properties would conflict.
            "anyOf" | "oneOf" | "prefixItems" => {
                if let Value::Array(subs) = value {
                    for sub in subs {
                        strict_objects(sub, depth + 1);
                    }
                }
            }
            "items"
            | "additionalProperties"
            | "not"
            | "contains"
            | "if"
            | "then"
            | "else"
            | "additionalItems"
            | "unevaluatedProperties"
            | "propertyNames" => match value {
                Value::Array(subs) => subs.iter_mut().for_each(|s| strict_objects(s, depth + 1)),
                sub => strict_objects(sub, depth + 1),
            },
            _ => {}
        }
    }
}

/// Rejects a regular expression that does not parse, naming the problem (llguidance would
/// otherwise report it as a grammar error).
fn check_regex(rx: &str) -> Result<()> {
    regex_syntax::Parser::new()
        .parse(rx)
        .map(|_| ())
        .map_err(|e| anyhow!("invalid regex: {e}"))
}

/// A request's grammar state: which tokens may come next.
pub struct Constraint {
    /// Boxed: a matcher is large, and requests move through channels.
    matcher: Box<Matcher>,
    /// The allowed tokens of the current state, once computed.
    mask: Option<SimpleVob>,
}

impl Clone for Constraint {
    /// An independent copy (each of `n` choices follows its own path).
    fn clone(&self) -> Self {
        Constraint {
            matcher: Box::new(self.matcher.deep_clone()),
            mask: self.mask.clone(),
        }
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("done", &self.is_done())
            .finish()
    }
}

impl Constraint {
    /// The allowed tokens now, as bits (`words[id / 32] >> (id % 32) & 1`), computed once
    /// per state. Never empty: a grammar that cannot go on is an error.
    pub fn allowed(&mut self) -> Result<&[u32]> {
        if self.mask.is_none() {
            let mask = contained(|| self.matcher.compute_mask_or_eos())?;
            if mask.is_zero() {
                bail!("the grammar allows no token here");
            }
            self.mask = Some(mask);
        }
        Ok(self.mask.as_ref().expect("computed above").as_slice())
    }

    /// The allowed tokens computed by [`Self::allowed`] for the current state, if any.
    pub fn current_mask(&self) -> Option<&[u32]> {
        self.mask.as_ref().map(|m| m.as_slice())
    }

    /// Moves past `token` (which must have been allowed).
    pub fn advance(&mut self, token: u32) -> Result<()> {
        self.mask = None;
        contained(|| self.matcher.consume_token(token))
    }

    /// The grammar is complete: nothing more may follow.
    pub fn is_done(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// A grammar step whose panic fails its request (as an error), not the scheduler.
fn contained<T>(step: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(step))
        .unwrap_or_else(|_| bail!("internal error in the grammar engine"))
}

/// Whether bit `id` of a mask is set.
pub fn is_allowed(mask: &[u32], id: u32) -> bool {
    mask.get(id as usize / 32)
        .is_some_and(|w| w >> (id % 32) & 1 == 1)
}

/// Sets the logits of the tokens `mask` leaves out to −∞ (ids past the mask too).
pub fn mask_logits(mask: &[u32], logits: &mut [f32]) {
    for (i, chunk) in logits.chunks_mut(32).enumerate() {
        let word = mask.get(i).copied().unwrap_or(0);
        if word == u32::MAX {
            continue;
        }
        for (bit, l) in chunk.iter_mut().enumerate() {
            if word >> bit & 1 == 0 {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// Rewrites a GBNF-style grammar (llama.cpp's and SGLang's EBNF) as llguidance's Lark:
/// `name ::= ...` rules become `name: ...`, `root` becomes `start`, `[...]` character
/// classes become `/[...]/` regexes (Lark's brackets mean "optional"), and a rule that
/// spans lines is joined onto one.
pub fn ebnf_to_lark(text: &str) -> Result<String> {
    let mut rules: Vec<String> = Vec::new();
    let mut chars = text.chars().peekable();
    let mut current = String::new();
    let mut pending_name: Option<String> = None;
    while let Some(c) = chars.next() {
        match c {
            '#' => while chars.next_if(|&c| c != '\n').is_some() {},
            '"' => {
                current.push('"');
                copy_quoted(&mut chars, '"', "string", &mut current)?;
                current.push('"');
            }
            '[' => {
                current.push_str("/[");
                copy_quoted(&mut chars, ']', "character class", &mut current)?;
                current.push_str("]/");
            }
            ':' if chars.peek() == Some(&':') => {
                chars.next();
                if chars.next() != Some('=') {
                    bail!("grammar: expected `::=`");
                }
                // The word just before `::=` names a new rule.
                let trimmed = current.trim_end();
                let start = trimmed
                    .rfind(|c: char| !(c.is_alphanumeric() || c == '-' || c == '_'))
                    .map_or(0, |i| i + 1);
                let name = trimmed[start..].to_owned();
                if name.is_empty() {
                    bail!("grammar: `::=` without a rule name before it");
                }
                let body = trimmed[..start].to_owned();
                if let Some(prev) = pending_name.take() {
                    rules.push(format!("{prev}: {}", body.trim()));
                } else if !body.trim().is_empty() {
                    bail!("grammar: text before the first rule: {:?}", body.trim());
                }
                pending_name = Some(lark_name(&name));
                current.clear();
            }
            '\n' | '\r' | '\t' => current.push(' '),
            c if c.is_alphabetic() || c == '-' || c == '_' => {
                let mut word = String::from(c);
                while let Some(c) = chars.next_if(|c| c.is_alphanumeric() || *c == '-' || *c == '_')
                {
                    word.push(c);
                }
                current.push_str(&word);
            }
            c => current.push(c),
        }
    }
    let Some(last) = pending_name else {
        bail!("grammar: no rules (write `root ::= ...`)");
    };
    rules.push(format!("{last}: {}", current.trim()));
    // Names used in bodies: rewrite them the way rule names were.
    let lark = rules
        .iter()
        .map(|r| rename_references(r))
        .collect::<Vec<_>>()
        .join("\n");
    if !rules.iter().any(|r| r.starts_with("start:")) {
        bail!("grammar: no `root` rule");
    }
    Ok(lark)
}

/// Copies the inside of a string or character class up to its unescaped `close` (consumed,
/// not copied), escaping `/` (the end of a Lark regex).
fn copy_quoted(
    chars: &mut std::iter::Peekable<std::str::Chars>,
    close: char,
    what: &str,
    out: &mut String,
) -> Result<()> {
    loop {
        match chars.next() {
            Some('\\') => {
                out.push('\\');
                out.push(
                    chars
                        .next()
                        .ok_or_else(|| anyhow!("grammar: unterminated {what}"))?,
                );
            }
            Some(c) if c == close => return Ok(()),
            Some('/') if close == ']' => out.push_str("\\/"),
            Some(c) => out.push(c),
            None => bail!("grammar: unterminated {what}"),
        }
    }
}

/// A GBNF rule name as a Lark rule name: lower case (upper case names Lark terminals);
/// `root` is Lark's `start`, and a rule of the grammar's own named `start` steps aside.
fn lark_name(name: &str) -> String {
    match name.to_lowercase().as_str() {
        "root" => "start".to_owned(),
        "start" => "start_".to_owned(),
        n => n.to_owned(),
    }
}

/// Renames the rule references of one `name: body` line, leaving strings and regexes.
fn rename_references(rule: &str) -> String {
    let (name, body) = rule.split_once(": ").expect("written as `name: body`");
    let mut out = format!("{name}: ");
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' | '/' => {
                out.push(c);
                while let Some(d) = chars.next() {
                    out.push(d);
                    if d == '\\' {
                        if let Some(e) = chars.next() {
                            out.push(e);
                        }
                    } else if d == c {
                        break;
                    }
                }
            }
            c if c.is_alphabetic() || c == '_' => {
                let mut word = String::from(c);
                while let Some(c) = chars.next_if(|c| c.is_alphanumeric() || *c == '-' || *c == '_')
                {
                    word.push(c);
                }
                out.push_str(&lark_name(&word));
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gbnf_rules_become_lark_rules() {
        let g = r#"
            # arithmetic
            root ::= expr
            expr ::= term (("+" | "-") term)*
            term ::= [0-9]+ | "(" expr ")"
            my-rule ::= "a\"b" [^"\]/]{1,3}
        "#;
        let lark = ebnf_to_lark(g).unwrap();
        assert_eq!(
            lark,
            "start: expr\n\
             expr: term ((\"+\" | \"-\") term)*\n\
             term: /[0-9]/+ | \"(\" expr \")\"\n\
             my-rule: \"a\\\"b\" /[^\"\\]\\/]/{1,3}"
        );
    }

    /// Listed properties become the only ones, unbounded numbers get bounds; what the
    /// schema says itself, and allOf's parts, stay as written.
    #[test]
    fn schemas_are_tightened_only_where_silent() {
        let s = compact_json(&json!({
            "type": "object",
            "properties": {
                "a": {"type": "number"},
                "b": {"type": "integer", "minimum": 3},
                "c": {"type": "number", "maximum": -2e15, "multipleOf": 0.5},
                "d": {"type": "array", "items": {"type": "object", "properties": {}}},
                "e": {"type": "object", "properties": {}, "additionalProperties": true}
            },
            "allOf": [{"properties": {"x": {}}}]
        }))
        .unwrap();
        let p = &s["properties"];
        assert_eq!(s["additionalProperties"], json!(false));
        assert_eq!(
            p["a"],
            json!({"type": "number", "minimum": -1e15, "maximum": 1e15, "multipleOf": 1e-10})
        );
        assert_eq!(
            p["b"],
            json!({"type": "integer", "minimum": 3, "maximum": 1e15})
        );
        assert_eq!(
            p["c"],
            json!({"type": "number", "maximum": -2e15, "multipleOf": 0.5})
        );
        assert_eq!(p["d"]["items"]["additionalProperties"], json!(false));
        assert_eq!(p["e"]["additionalProperties"], json!(true));
        assert_eq!(s["allOf"][0].get("additionalProperties"), None);
        assert_eq!(s["x-guidance"]["whitespace_flexible"], json!(false));
    }

    #[test]
    fn broken_grammars_are_refused_with_a_reason() {
        for (g, why) in [
            ("", "no rules"),
            ("expr ::= \"a\"", "no `root` rule"),
            ("root ::= \"a", "unterminated string"),
            ("root ::= [a-z", "unterminated character class"),
            ("x root ::= \"a\"", "text before the first rule"),
        ] {
            let e = ebnf_to_lark(g).unwrap_err().to_string();
            assert!(e.contains(why), "{g:?}: {e}");
        }
    }
}
