//! OpenAI function calling on chat completions: `tools` and `tool_choice` read and checked,
//! the tools shown to the model (through its chat template, or in Hermes' words when the
//! template has no place for them), `required` and named choices enforced by a grammar, and
//! the reply parsed into `tool_calls`.
//!
//! Two reply formats, chosen from the chat template as vLLM's and SGLang's parsers are:
//! Hermes / Qwen (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, also what a
//! template without tools is taught) and Llama 3 (the reply is one JSON object,
//! `{"name": ..., "parameters": {...}}`, after an optional `<|python_tag|>`).

use super::ApiError;
use crate::engine::grammar::GrammarSpec;
use crate::engine::{ChatMessage, ChatTemplate};
use serde_json::{json, Value};

/// How the model writes a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    Hermes,
    Llama3,
}

impl ToolFormat {
    /// The format `template` speaks; Hermes when it has no tools at all (we teach it).
    pub fn of(template: &ChatTemplate) -> Self {
        let src = template.source();
        if !src.contains("<tool_call>")
            && (src.contains("<|python_tag|>") || src.contains("ipython"))
        {
            ToolFormat::Llama3
        } else {
            ToolFormat::Hermes
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    Auto,
    None,
    Required,
    Named(String),
}

/// A request's tools, checked.
#[derive(Debug, Clone)]
pub struct Tools {
    /// The tools as sent (`{"type": "function", "function": {...}}`), parameters filled in.
    pub specs: Vec<Value>,
    pub choice: ToolChoice,
    pub format: ToolFormat,
}

/// One call the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as a JSON text (OpenAI sends them so).
    pub arguments: String,
}

/// Reads `tools` and `tool_choice`; `None` when the request has no tools or chose `none`.
pub fn parse(
    tools: Option<&Value>,
    choice: Option<&Value>,
    format: ToolFormat,
) -> Result<Option<Tools>, ApiError> {
    let bad = |param: &'static str, m: String| ApiError::param(param, m);
    let specs = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, t)| check_tool(i, t))
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(bad("tools", "`tools` must be a list of functions".into())),
    };
    let names: Vec<&str> = specs.iter().map(tool_name).collect();
    let choice = match choice {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => {
                return Err(bad(
                    "tool_choice",
                    format!(
                    "tool_choice `{other}` is not one of auto, none, required, or a named function"
                ),
                ))
            }
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    bad(
                        "tool_choice",
                        "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}".into(),
                    )
                })?;
            if !names.contains(&name) {
                return Err(bad(
                    "tool_choice",
                    format!("tool_choice names `{name}`, which is not among the tools"),
                ));
            }
            ToolChoice::Named(name.to_owned())
        }
    };
    if specs.is_empty() {
        return match choice {
            ToolChoice::Auto | ToolChoice::None => Ok(None),
            _ => Err(bad(
                "tool_choice",
                "tool_choice asks for a call, but `tools` is empty".into(),
            )),
        };
    }
    if choice == ToolChoice::None {
        return Ok(None);
    }
    Ok(Some(Tools {
        specs,
        choice,
        format,
    }))
}

/// One tool, checked: a function with a usable name and an object schema for parameters.
fn check_tool(i: usize, tool: &Value) -> Result<Value, ApiError> {
    let bad = |m: &str| ApiError::param("tools", format!("tools[{i}]: {m}"));
    if tool.get("type").and_then(Value::as_str) != Some("function") {
        return Err(bad("`type` must be \"function\""));
    }
    let f = tool
        .get("function")
        .filter(|f| f.is_object())
        .ok_or_else(|| bad("needs a `function` object"))?;
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("`function.name` must be a string"))?;
    let valid = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid {
        return Err(bad(&format!(
            "function name `{name}` must be 1 to 64 letters, digits, `_` or `-`"
        )));
    }
    let parameters = match f.get("parameters") {
        None => json!({"type": "object", "properties": {}}),
        Some(p) if p.is_object() => p.clone(),
        Some(_) => return Err(bad("`function.parameters` must be a JSON schema object")),
    };
    let mut f = f.clone();
    f["parameters"] = parameters;
    Ok(json!({"type": "function", "function": f}))
}

fn tool_name(spec: &Value) -> &str {
    spec["function"]["name"].as_str().expect("checked")
}

impl Tools {
    /// The grammar every reply must follow: a call of one of the tools (of the named one)
    /// when the choice demands a call, else any text (`None`). It is compiled in any case,
    /// so that a parameters schema that cannot be used is refused.
    pub fn grammar(&self) -> GrammarSpec {
        let calls: Vec<Value> = self
            .specs
            .iter()
            .filter(|t| match &self.choice {
                ToolChoice::Named(n) => tool_name(t) == n,
                _ => true,
            })
            .map(|t| {
                let key = match self.format {
                    ToolFormat::Hermes => "arguments",
                    ToolFormat::Llama3 => "parameters",
                };
                json!({"type": "object", "properties": {
                    "name": {"const": tool_name(t)},
                    key: t["function"]["parameters"],
                }, "required": ["name", key]})
            })
            .collect();
        let schema = json!({"anyOf": calls});
        match self.format {
            ToolFormat::Hermes => GrammarSpec::TaggedJson {
                before: "<tool_call>\n".into(),
                schema,
                after: "\n</tool_call>".into(),
            },
            ToolFormat::Llama3 => GrammarSpec::JsonSchema(schema),
        }
    }

    /// Whether the grammar must hold (`required`, a named function).
    pub fn enforced(&self) -> bool {
        matches!(self.choice, ToolChoice::Required | ToolChoice::Named(_))
    }

    /// The conversation as the template should see it. A template that renders `tools`
    /// gets them and the calls as data; another is taught Hermes' format in a system
    /// message, with earlier calls and results written out in it.
    pub fn messages_for(
        &self,
        template: &ChatTemplate,
        messages: Vec<ChatMessage>,
    ) -> (Vec<ChatMessage>, bool) {
        if template.source().contains("tools") {
            return (messages, true);
        }
        let listed: Vec<String> = self.specs.iter().map(|t| t.to_string()).collect();
        let teach = format!(
            "You are a function calling AI model. You may call one or more functions to assist with the user query. \
             You are given the functions in <tools></tools> XML tags:\n<tools>\n{}\n</tools>\n\
             For each function call, return a JSON object with the function name and arguments within \
             <tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>",
            listed.join("\n")
        );
        let mut out = Vec::with_capacity(messages.len() + 1);
        let mut messages = messages.into_iter().peekable();
        match messages.next_if(|m| m.role == "system" || m.role == "developer") {
            Some(m) => out.push(ChatMessage::new(
                "system",
                &format!("{}\n\n{teach}", m.content),
            )),
            None => out.push(ChatMessage::new("system", &teach)),
        }
        for m in messages {
            out.push(written_out(m));
        }
        (out, false)
    }

    /// The calls in a finished reply, and the text around them (`None` when there is none).
    pub fn parse_reply(&self, text: &str) -> (Option<String>, Vec<ToolCall>) {
        match self.format {
            ToolFormat::Hermes => parse_hermes(text),
            ToolFormat::Llama3 => parse_llama3(text),
        }
    }
}

/// The conversation for a template with no place for tool calls and results (when the
/// request offers no tools): calls and results written out in Hermes' words.
pub fn history_as_text(template: &ChatTemplate, messages: Vec<ChatMessage>) -> Vec<ChatMessage> {
    if template.source().contains("tools") {
        return messages;
    }
    messages.into_iter().map(written_out).collect()
}

/// A message with calls or a tool result, as text for a template that knows neither.
fn written_out(m: ChatMessage) -> ChatMessage {
    if m.role == "tool" {
        return ChatMessage::new(
            "user",
            &format!("<tool_response>\n{}\n</tool_response>", m.content),
        );
    }
    let Some(Value::Array(calls)) = &m.tool_calls else {
        return m;
    };
    let mut content = m.content.clone();
    for c in calls {
        let call = json!({"name": c["function"]["name"], "arguments": c["function"]["arguments"]});
        if !content.is_empty() {
            content.push('\n');
        }
        content.push_str(&format!("<tool_call>\n{call}\n</tool_call>"));
    }
    ChatMessage::new(&m.role, &content)
}

/// A call object `{"name", "arguments" | "parameters"}` as a [`ToolCall`].
fn call_of(v: &Value) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?.to_owned();
    let args = v.get("arguments").or_else(|| v.get("parameters"))?;
    let arguments = match args {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    Some(ToolCall { name, arguments })
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

fn parse_hermes(text: &str) -> (Option<String>, Vec<ToolCall>) {
    let mut calls = Vec::new();
    let mut content = String::new();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len()..];
        let (inner, next) = match after.find(CLOSE) {
            Some(end) => (&after[..end], &after[end + CLOSE.len()..]),
            None => (after, ""),
        };
        match serde_json::from_str::<Value>(inner.trim())
            .ok()
            .as_ref()
            .and_then(call_of)
        {
            Some(call) => {
                content.push_str(&rest[..start]);
                calls.push(call);
            }
            // Not a call after all: it stays text.
            None => content.push_str(&rest[..rest.len() - next.len()]),
        }
        rest = next;
    }
    content.push_str(rest);
    let content = content.trim();
    ((!content.is_empty()).then(|| content.to_owned()), calls)
}

fn parse_llama3(text: &str) -> (Option<String>, Vec<ToolCall>) {
    let body = text.trim().trim_start_matches("<|python_tag|>").trim();
    if body.starts_with('{') {
        if let Some(call) = serde_json::from_str::<Value>(body)
            .ok()
            .as_ref()
            .and_then(call_of)
        {
            return (None, vec![call]);
        }
    }
    (
        (!text.trim().is_empty()).then(|| text.to_owned()),
        Vec::new(),
    )
}

/// OpenAI's `tool_calls` list for `calls`.
pub fn tool_calls_json(calls: &[ToolCall]) -> Value {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({"index": i, "id": format!("call_{:016x}", rand::random::<u64>()), "type": "function",
                "function": {"name": c.name, "arguments": c.arguments}})
        })
        .collect()
}

/// Streaming with tools: text goes out as it comes until it may be a call; from there it
/// is held and parsed at the end.
pub struct CallStream<'a> {
    tools: &'a Tools,
    text: String,
    /// Bytes of `text` already sent as content.
    sent: usize,
    holding: bool,
}

impl<'a> CallStream<'a> {
    pub fn new(tools: &'a Tools) -> Self {
        CallStream {
            tools,
            text: String::new(),
            sent: 0,
            holding: false,
        }
    }

    /// The content that can go out now, after `piece`.
    pub fn push(&mut self, piece: &str) -> String {
        self.text.push_str(piece);
        if self.holding {
            return String::new();
        }
        let unsent = &self.text[self.sent..];
        let start_of_call = match self.tools.format {
            ToolFormat::Hermes => unsent.find(OPEN),
            ToolFormat::Llama3 => {
                let t = self.text.trim_start();
                (t.starts_with('{') || t.starts_with("<|python_tag|>")).then_some(0)
            }
        };
        if let Some(at) = start_of_call {
            self.holding = true;
            let out = unsent[..at].to_owned();
            self.sent += at;
            return out;
        }
        // Hold back what may be the beginning of a call's opening.
        let keep = match self.tools.format {
            ToolFormat::Hermes => (1..OPEN.len().min(unsent.len() + 1))
                .rev()
                .find(|&n| {
                    unsent.is_char_boundary(unsent.len() - n)
                        && OPEN.starts_with(&unsent[unsent.len() - n..])
                })
                .unwrap_or(0),
            ToolFormat::Llama3 => {
                if self.text.trim().is_empty()
                    || "<|python_tag|>".starts_with(self.text.trim_start())
                {
                    unsent.len()
                } else {
                    0
                }
            }
        };
        let out = unsent[..unsent.len() - keep].to_owned();
        self.sent += out.len();
        out
    }

    /// At the end: the content still unsent, and the calls.
    pub fn finish(self) -> (String, Vec<ToolCall>) {
        let (_, calls) = self.tools.parse_reply(&self.text);
        let rest = &self.text[self.sent..];
        if calls.is_empty() {
            return (rest.to_owned(), calls);
        }
        // Content after the calls is dropped with them (it is the calls' framing).
        let (content, _) = self.tools.parse_reply(rest);
        (content.unwrap_or_default(), calls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(format: ToolFormat) -> Tools {
        let t = json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
        parse(Some(&t), None, format).unwrap().unwrap()
    }

    #[test]
    fn hermes_replies_parse_into_calls_and_content() {
        let t = tools(ToolFormat::Hermes);
        let (content, calls) = t.parse_reply(
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        );
        assert_eq!(content.as_deref(), Some("Let me check."));
        assert_eq!(
            calls,
            [ToolCall {
                name: "get_weather".into(),
                arguments: "{\"city\":\"Paris\"}".into()
            }]
        );
        let (content, calls) = t.parse_reply("<tool_call>not json</tool_call> plain");
        assert!(calls.is_empty());
        assert_eq!(
            content.as_deref(),
            Some("<tool_call>not json</tool_call> plain")
        );
    }

    #[test]
    fn llama3_replies_parse_as_one_json_call() {
        let t = tools(ToolFormat::Llama3);
        let (content, calls) = t.parse_reply(
            "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}",
        );
        assert_eq!(content, None);
        assert_eq!(calls[0].arguments, "{\"city\":\"Oslo\"}");
        assert_eq!(t.parse_reply("Hello").1, []);
    }

    /// Streamed text equals the whole reply's content, however the pieces fall, and a call
    /// split across pieces is held, not sent as text.
    #[test]
    fn streamed_content_and_calls_match_the_whole_reply() {
        let t = tools(ToolFormat::Hermes);
        let reply = "Sure <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>";
        for cut in 1..12 {
            let mut s = CallStream::new(&t);
            let mut sent = String::new();
            let chars: Vec<char> = reply.chars().collect();
            for piece in chars.chunks(cut) {
                sent.push_str(&s.push(&piece.iter().collect::<String>()));
            }
            let (rest, calls) = s.finish();
            sent.push_str(&rest);
            assert_eq!(sent.trim(), "Sure", "pieces of {cut}");
            assert_eq!(calls.len(), 1);
        }
        let mut s = CallStream::new(&t);
        let mut sent = s.push("a <tool");
        sent.push_str(&s.push("s are fun"));
        let (rest, calls) = s.finish();
        assert_eq!(sent + &rest, "a <tools are fun");
        assert!(calls.is_empty());
    }

    #[test]
    fn bad_tools_are_refused_naming_the_problem() {
        let f = |t: Value, c: Option<Value>| {
            parse(Some(&t), c.as_ref(), ToolFormat::Hermes)
                .unwrap_err()
                .message
        };
        assert!(f(json!({}), None).contains("list"));
        assert!(f(json!([{"type": "retrieval"}]), None).contains("tools[0]"));
        assert!(f(
            json!([{"type": "function", "function": {"name": "a b"}}]),
            None
        )
        .contains("a b"));
        assert!(f(
            json!([{"type": "function", "function": {"name": "a", "parameters": 3}}]),
            None
        )
        .contains("parameters"));
        let ok = json!([{"type": "function", "function": {"name": "a"}}]);
        assert!(f(ok.clone(), Some(json!("sometimes"))).contains("sometimes"));
        assert!(f(
            ok,
            Some(json!({"type": "function", "function": {"name": "b"}}))
        )
        .contains("`b`"));
    }
}
