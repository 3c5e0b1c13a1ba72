//! Chat templates from GGUF metadata and Hugging Face folders, against the fixtures.

mod common;

use serde::Deserialize;
use tpserve::engine::{ChatMessage, ChatTemplate, Tokenizer};
use tpserve::loader;

#[derive(Deserialize)]
struct Reference {
    chat: ChatCase,
}

#[derive(Deserialize)]
struct ChatCase {
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    prompt_text: String,
    input_ids: Vec<u32>,
}

fn template_and_tokenizer(path: &std::path::Path) -> (ChatTemplate, Tokenizer) {
    let files = loader::open_model(path).unwrap();
    let spec = files.chat_template.expect("the model has a chat template");
    let template = ChatTemplate::new(&spec.source, &spec.bos_token, &spec.eos_token).unwrap();
    (
        template,
        Tokenizer::new(files.tokenizer.as_ref().unwrap()).unwrap(),
    )
}

#[test]
fn gguf_chat_template_renders_the_reference_prompt() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/smollm2/reference.json");
    let reference: Reference =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let (template, tokenizer) = template_and_tokenizer(&common::smollm2());
    let text = template
        .render(
            &reference.chat.messages,
            reference.chat.add_generation_prompt,
        )
        .unwrap();
    assert_eq!(text, reference.chat.prompt_text);
    assert_eq!(
        tokenizer.encode_chat(&text).unwrap(),
        reference.chat.input_ids
    );
}

#[test]
fn hugging_face_folder_chat_template() {
    // The fixture's "chat" case is SmolLM2's template applied to "Hi!".
    let (template, tokenizer) = template_and_tokenizer(&common::fixture("tiny-smollm-tok"));
    let text = template.render(&[ChatMessage::user("Hi!")], true).unwrap();
    let reference = common::reference("tiny-smollm-tok");
    let case = reference.cases.iter().find(|c| c.name == "chat").unwrap();
    assert_eq!(tokenizer.encode_chat(&text).unwrap(), case.input_ids);
}

/// `generate --chat`: the 37-token prompt, a first token on the knife edge between "The"
/// (504) and "L" (60), the same reply at tp 1, 2 and 3, ending at the end of the turn.
#[test]
fn generate_chat_on_smollm2_at_every_tp() {
    let model = common::smollm2();
    let mut replies = vec![];
    for tp in ["1", "2", "3"] {
        let v = common::tpserve_json(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--tp",
            tp,
            "--json",
            "--chat",
            "What is the capital of France?",
            "--temperature",
            "0",
            "--max-new-tokens",
            "48",
        ]);
        assert_eq!(v["input_ids"].as_array().unwrap().len(), 37);
        let ids: Vec<u64> = v["output_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert!(ids[0] == 504 || ids[0] == 60, "first token {}", ids[0]);
        match v["finish_reason"].as_str().unwrap() {
            "stop" => assert_eq!(*ids.last().unwrap(), 2, "stops at <|im_end|>"),
            _ => assert_eq!(ids.len(), 48),
        }
        assert!(!v["text"].as_str().unwrap().contains("<|im_end|>"));
        replies.push(ids);
    }
    assert!(replies.windows(2).all(|w| w[0] == w[1]), "{replies:?}");
}

#[test]
fn a_model_without_a_chat_template_says_how_to_proceed() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tpserve"))
        .args([
            "generate",
            "--model",
            common::fixture("tiny-llama").to_str().unwrap(),
        ])
        .args(["--chat", "hi"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("chat template") && err.contains("--chat-template"),
        "{err}"
    );
}
