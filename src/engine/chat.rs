//! Chat templates (Jinja, as in Hugging Face tokenizer configs and GGUF metadata) rendered
//! with minijinja and Python-compatible string methods.

use anyhow::{anyhow, Result};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant's function calls, as transformers' templates read them:
    /// `[{"id", "type": "function", "function": {"name", "arguments": {...}}}]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// The call a tool message answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
        }
    }

    pub fn user(content: &str) -> Self {
        Self::new("user", content)
    }
}

/// A compiled chat template and the special-token strings it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The template's text: which tool-call format it speaks is read from it.
    source: String,
    bos_token: String,
    eos_token: String,
}

const NAME: &str = "chat";

/// Template instructions one render may run: real templates take thousands per message;
/// a hostile one (nested loops over huge ranges) stops with an error instead of holding a
/// server thread for ever.
const FUEL: u64 = 5_000_000;

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL));
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // transformers templates signal bad input this way.
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(NAME, source.to_owned())
            .map_err(|e| anyhow!("the chat template does not parse: {e}"))?;
        Ok(ChatTemplate {
            env,
            source: source.to_owned(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The prompt text for `messages`; with `add_generation_prompt`, ending where the
    /// assistant's reply begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// [`Self::render`] with OpenAI's `tools` (function specs) passed to the template, as
    /// transformers' `apply_chat_template(tools=...)` does.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.env.get_template(NAME).expect("added in new");
        template
            .render(minijinja::context! {
                messages => minijinja::value::Serde(messages),
                tools => tools.map(minijinja::value::Serde),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| anyhow!("cannot render the chat template: {e}"))
    }
}

impl ChatTemplate {
    /// The template's own text.
    pub fn source(&self) -> &str {
        &self.source
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_messages_and_generation_prompt() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}[{{ m.role | upper }}] {{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}",
            "<s>",
            "</s>",
        )
        .unwrap();
        let text = t.render(&[ChatMessage::user("  hi  ")], true).unwrap();
        assert_eq!(text, "<s>[USER] hi\n[ASSISTANT]");
    }

    /// Tools and an assistant's calls reach the template as transformers passes them.
    #[test]
    fn renders_tools_and_tool_calls() {
        let t = ChatTemplate::new(
            "{% for t in tools %}<{{ t.function.name }}>{% endfor %}{% for m in messages %}{% for c in m.tool_calls or [] %}{{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}{{ m.tool_call_id or '' }}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls =
            Some(serde_json::json!([{"function": {"name": "w", "arguments": {"city": "Oslo"}}}]));
        let mut result = ChatMessage::new("tool", "18");
        result.tool_call_id = Some("call_1".into());
        let tools = [serde_json::json!({"type": "function", "function": {"name": "w"}})];
        let text = t
            .render_with_tools(&[call, result], Some(&tools), true)
            .unwrap();
        assert_eq!(text, "<w>w(Oslo)call_1");
    }

    #[test]
    fn template_errors_are_reported() {
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
        let err = t.render(&[], true).unwrap_err();
        assert!(format!("{err}").contains("roles must alternate"));
    }
}
