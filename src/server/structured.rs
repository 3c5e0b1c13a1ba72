//! Structured outputs at the API: OpenAI's `response_format`, SGLang's `json_schema`,
//! `regex` and `ebnf`, read into a [`GrammarSpec`] and compiled before the request is queued
//! (a bad schema is a 400 that names the problem).

use super::{ApiError, AppState};
use crate::engine::grammar::{Constraint, GrammarSpec};
use serde_json::{json, Value};

/// The constraint fields a request may carry; at most one may be set.
#[derive(Debug, Default)]
pub struct ConstraintFields<'a> {
    pub response_format: Option<&'a Value>,
    pub json_schema: Option<&'a Value>,
    pub regex: Option<&'a str>,
    pub ebnf: Option<&'a str>,
}

impl ConstraintFields<'_> {
    /// The grammar these fields ask for, if any.
    pub fn spec(&self) -> Result<Option<GrammarSpec>, ApiError> {
        let mut specs = Vec::new();
        if let Some(format) = self.response_format {
            if let Some(spec) = response_format(format)? {
                specs.push(("response_format", spec));
            }
        }
        if let Some(schema) = self.json_schema {
            specs.push((
                "json_schema",
                GrammarSpec::JsonSchema(schema_value(schema)?),
            ));
        }
        if let Some(rx) = self.regex {
            specs.push(("regex", GrammarSpec::Regex(rx.to_owned())));
        }
        if let Some(g) = self.ebnf {
            specs.push(("ebnf", GrammarSpec::Ebnf(g.to_owned())));
        }
        match specs.len() {
            0 => Ok(None),
            1 => Ok(specs.pop().map(|(_, s)| s)),
            _ => Err(ApiError::bad_request(format!(
                "give at most one of response_format, json_schema, regex and ebnf; this request has {}",
                specs.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ))),
        }
    }
}

/// OpenAI's `response_format`: `text`, `json_object` or `json_schema`.
fn response_format(format: &Value) -> Result<Option<GrammarSpec>, ApiError> {
    let bad = |m: String| ApiError::param("response_format", m);
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(GrammarSpec::JsonSchema(json!({"type": "object"})))),
        Some("json_schema") => {
            let inner = format.get("json_schema").ok_or_else(|| {
                bad("response_format of type json_schema needs a `json_schema` object".into())
            })?;
            if !inner.is_object() {
                return Err(bad("`response_format.json_schema` must be an object".into()));
            }
            // OpenAI allows a schema-less json_schema: any JSON object.
            let schema = inner
                .get("schema")
                .cloned()
                .unwrap_or_else(|| json!({"type": "object"}));
            Ok(Some(GrammarSpec::JsonSchema(schema)))
        }
        Some(other) => Err(bad(format!(
            "response_format type `{other}` is not one of text, json_object, json_schema"
        ))),
        None => Err(bad("response_format needs a `type`".into())),
    }
}

/// A schema given as an object, or as a string holding one (SGLang's `json_schema`).
fn schema_value(v: &Value) -> Result<Value, ApiError> {
    match v {
        Value::String(s) => serde_json::from_str(s)
            .map_err(|e| ApiError::param("json_schema", format!("json_schema is not JSON: {e}"))),
        other => Ok(other.clone()),
    }
}

/// Compiles `spec` for this server's vocabulary, off the async runtime's threads.
pub async fn compile(
    state: &std::sync::Arc<AppState>,
    spec: GrammarSpec,
) -> Result<Constraint, ApiError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || {
        let grammars = state.grammars.as_ref().map_err(|why| {
            ApiError::bad_request(format!(
                "constrained decoding is not available for this model: {why}"
            ))
        })?;
        grammars
            .compile(&spec)
            .map_err(|e| ApiError::bad_request(format!("cannot use this {}: {e:#}", spec.kind())))
    })
    .await
    .map_err(|_| ApiError::bad_request("the grammar could not be compiled (internal error)"))?
}
