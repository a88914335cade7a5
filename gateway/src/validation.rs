//! Turning client requests into validated requests, once, at the edge (TGI's `validation`):
//! everything the scheduler gets is already checked, tokenized and defaulted. Each error names
//! the offending field as the client wrote it.

use strata_proto::v1::{
    ChatRequest, GenerateRequest, SamplingParameters, generate_request, stop_sequence,
};
use strata_shared::wire::SamplingParams;

use crate::error::GatewayError;
use crate::tokenizer::{Message, ModelTokenizer};

/// Longest stop sequence accepted, in bytes.
pub const MAX_STOP_BYTES: usize = 1024;

/// Server-side limits requests are checked against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Positions one sequence may use (prompt + output).
    pub context_length: usize,
    pub vocab_size: usize,
    /// `max_tokens` when the request leaves it unset (capped by what the context leaves).
    pub default_max_tokens: u32,
    pub max_stop_sequences: usize,
    pub max_top_logprobs: u32,
}

impl Limits {
    /// The service's limits for a context window and vocabulary: at most 16 stop sequences and
    /// 20 top log-probabilities per token.
    pub fn new(context_length: usize, vocab_size: usize, default_max_tokens: u32) -> Self {
        Limits {
            context_length,
            vocab_size,
            default_max_tokens,
            max_stop_sequences: 16,
            max_top_logprobs: 20,
        }
    }
}

/// A request ready to schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub input_ids: Vec<u32>,
    pub max_new_tokens: u32,
    pub params: SamplingParams,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub include_special_tokens: bool,
}

/// Validates a `Generate` request.
pub fn generate(
    req: GenerateRequest,
    tok: &ModelTokenizer,
    limits: &Limits,
) -> Result<ValidRequest, GatewayError> {
    let input_ids = match req.input {
        Some(generate_request::Input::Prompt(text)) => {
            if text.is_empty() {
                return Err(GatewayError::invalid("prompt", "must not be empty"));
            }
            let ids = tok.encode(&text, req.add_special_tokens)?;
            if ids.is_empty() {
                return Err(GatewayError::invalid("prompt", "tokenizes to no tokens"));
            }
            ids
        }
        Some(generate_request::Input::TokenIds(t)) => {
            if t.ids.is_empty() {
                return Err(GatewayError::invalid("token_ids.ids", "must not be empty"));
            }
            if let Some((i, id)) = t
                .ids
                .iter()
                .enumerate()
                .find(|(_, id)| **id as usize >= limits.vocab_size)
            {
                return Err(GatewayError::invalid(
                    format!("token_ids.ids[{i}]"),
                    format!(
                        "{id} is outside the vocabulary of {} tokens",
                        limits.vocab_size
                    ),
                ));
            }
            t.ids
        }
        None => {
            return Err(GatewayError::invalid(
                "input",
                "set `prompt` or `token_ids`",
            ));
        }
    };
    finish(input_ids, req.parameters, "prompt", limits)
}

/// Validates a `Chat` request (rendering the model's chat template).
pub fn chat(
    req: ChatRequest,
    tok: &ModelTokenizer,
    limits: &Limits,
) -> Result<ValidRequest, GatewayError> {
    if req.messages.is_empty() {
        return Err(GatewayError::invalid(
            "messages",
            "must hold at least one message",
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        if m.role.is_empty() {
            return Err(GatewayError::invalid(
                format!("messages[{i}].role"),
                "must not be empty",
            ));
        }
        messages.push(Message {
            role: m.role,
            content: m.content,
        });
    }
    let text = tok.render_chat(&messages, req.add_generation_prompt.unwrap_or(true))?;
    let ids = tok.encode(&text, false)?;
    finish(ids, req.parameters, "messages", limits)
}

fn check_range(field: &str, v: f32, lo: f32, hi: f32, lo_open: bool) -> Result<(), GatewayError> {
    let ok = v.is_finite() && (if lo_open { v > lo } else { v >= lo }) && v <= hi;
    if ok {
        Ok(())
    } else {
        let open = if lo_open { "(" } else { "[" };
        Err(GatewayError::invalid(
            field,
            format!("must be in {open}{lo}, {hi}], got {v}"),
        ))
    }
}

fn finish(
    input_ids: Vec<u32>,
    params: Option<SamplingParameters>,
    input_field: &str,
    limits: &Limits,
) -> Result<ValidRequest, GatewayError> {
    let p = params.unwrap_or_default();
    // Ids from text too: a tokenizer may know more tokens than the model embeds.
    if let Some(id) = input_ids
        .iter()
        .find(|id| **id as usize >= limits.vocab_size)
    {
        return Err(GatewayError::invalid(
            input_field,
            format!(
                "tokenizes to id {id}, outside the model's vocabulary of {} tokens",
                limits.vocab_size
            ),
        ));
    }
    let prompt_len = input_ids.len();
    if prompt_len >= limits.context_length {
        return Err(GatewayError::invalid(
            input_field,
            format!(
                "{prompt_len} tokens do not fit the context window of {} tokens (at least one must be left to generate)",
                limits.context_length
            ),
        ));
    }
    let room = (limits.context_length - prompt_len) as u32;
    let max_new_tokens = match p.max_tokens {
        Some(0) => {
            return Err(GatewayError::invalid(
                "parameters.max_tokens",
                "must be at least 1",
            ));
        }
        Some(n) if n > room => {
            return Err(GatewayError::invalid(
                "parameters.max_tokens",
                format!(
                    "{n} tokens after a {prompt_len}-token prompt exceed the context window of {} tokens (at most {room})",
                    limits.context_length
                ),
            ));
        }
        Some(n) => n,
        None => limits.default_max_tokens.min(room),
    };
    let temperature = p.temperature.unwrap_or(1.0);
    check_range("parameters.temperature", temperature, 0.0, 100.0, false)?;
    let top_p = p.top_p.unwrap_or(1.0);
    check_range("parameters.top_p", top_p, 0.0, 1.0, true)?;
    let min_p = p.min_p.unwrap_or(0.0);
    check_range("parameters.min_p", min_p, 0.0, 1.0, false)?;
    let repetition_penalty = p.repetition_penalty.unwrap_or(1.0);
    check_range(
        "parameters.repetition_penalty",
        repetition_penalty,
        0.0,
        100.0,
        true,
    )?;
    let frequency_penalty = p.frequency_penalty.unwrap_or(0.0);
    check_range(
        "parameters.frequency_penalty",
        frequency_penalty,
        -2.0,
        2.0,
        false,
    )?;
    let presence_penalty = p.presence_penalty.unwrap_or(0.0);
    check_range(
        "parameters.presence_penalty",
        presence_penalty,
        -2.0,
        2.0,
        false,
    )?;
    if p.top_logprobs > limits.max_top_logprobs {
        return Err(GatewayError::invalid(
            "parameters.top_logprobs",
            format!(
                "must be at most {}, got {}",
                limits.max_top_logprobs, p.top_logprobs
            ),
        ));
    }
    if p.stop.len() > limits.max_stop_sequences {
        return Err(GatewayError::invalid(
            "parameters.stop",
            format!(
                "at most {} stop sequences, got {}",
                limits.max_stop_sequences,
                p.stop.len()
            ),
        ));
    }
    let mut stop = Vec::with_capacity(p.stop.len());
    for (i, s) in p.stop.into_iter().enumerate() {
        match s.kind {
            Some(stop_sequence::Kind::Text(t)) if t.is_empty() => {
                return Err(GatewayError::invalid(
                    format!("parameters.stop[{i}].text"),
                    "must not be empty",
                ));
            }
            Some(stop_sequence::Kind::Text(t)) if t.len() > MAX_STOP_BYTES => {
                return Err(GatewayError::invalid(
                    format!("parameters.stop[{i}].text"),
                    format!("{} bytes long; at most {MAX_STOP_BYTES}", t.len()),
                ));
            }
            Some(stop_sequence::Kind::Text(t)) => stop.push(t),
            None => {
                return Err(GatewayError::invalid(
                    format!("parameters.stop[{i}]"),
                    "unknown stop-sequence type (this server understands `text`)",
                ));
            }
        }
    }
    Ok(ValidRequest {
        input_ids,
        max_new_tokens,
        params: SamplingParams {
            temperature,
            top_k: p.top_k.unwrap_or(0),
            top_p,
            min_p,
            repetition_penalty,
            frequency_penalty,
            presence_penalty,
            seed: p.seed.unwrap_or_else(rand::random),
            top_logprobs: p.top_logprobs,
            logprobs: p.logprobs,
        },
        stop,
        ignore_eos: p.ignore_eos,
        include_special_tokens: p.include_special_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_proto::v1::{StopSequence, TokenIds};

    fn tok() -> ModelTokenizer {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/golden/smollm2/hf/tokenizer.json");
        ModelTokenizer::from_tokenizer_json(&std::fs::read(path).unwrap(), "tokenizer.json")
            .unwrap()
    }

    const LIMITS: Limits = Limits {
        context_length: 64,
        vocab_size: 49152,
        default_max_tokens: 256,
        max_stop_sequences: 4,
        max_top_logprobs: 20,
    };

    fn req(p: SamplingParameters) -> GenerateRequest {
        GenerateRequest {
            input: Some(generate_request::Input::Prompt("Hello there".into())),
            parameters: Some(p),
            add_special_tokens: false,
        }
    }

    fn err(r: GenerateRequest) -> String {
        generate(r, &tok(), &LIMITS).unwrap_err().to_string()
    }

    #[test]
    fn defaults_fill_in() {
        let v = generate(req(SamplingParameters::default()), &tok(), &LIMITS).unwrap();
        assert_eq!(v.input_ids.len(), 2);
        assert_eq!(v.max_new_tokens, 62, "default capped by the context left");
        assert_eq!(v.params.temperature, 1.0);
        assert!(!v.params.logprobs);
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: Vec<(SamplingParameters, &str)> = vec![
            (
                SamplingParameters {
                    temperature: Some(-1.0),
                    ..Default::default()
                },
                "parameters.temperature: must be in [0, 100], got -1",
            ),
            (
                SamplingParameters {
                    temperature: Some(f32::NAN),
                    ..Default::default()
                },
                "parameters.temperature",
            ),
            (
                SamplingParameters {
                    top_p: Some(0.0),
                    ..Default::default()
                },
                "parameters.top_p: must be in (0, 1], got 0",
            ),
            (
                SamplingParameters {
                    top_p: Some(1.5),
                    ..Default::default()
                },
                "parameters.top_p",
            ),
            (
                SamplingParameters {
                    min_p: Some(2.0),
                    ..Default::default()
                },
                "parameters.min_p",
            ),
            (
                SamplingParameters {
                    repetition_penalty: Some(0.0),
                    ..Default::default()
                },
                "parameters.repetition_penalty",
            ),
            (
                SamplingParameters {
                    frequency_penalty: Some(3.0),
                    ..Default::default()
                },
                "parameters.frequency_penalty",
            ),
            (
                SamplingParameters {
                    presence_penalty: Some(-2.5),
                    ..Default::default()
                },
                "parameters.presence_penalty",
            ),
            (
                SamplingParameters {
                    max_tokens: Some(0),
                    ..Default::default()
                },
                "parameters.max_tokens: must be at least 1",
            ),
            (
                SamplingParameters {
                    max_tokens: Some(63),
                    ..Default::default()
                },
                "parameters.max_tokens: 63 tokens after a 2-token prompt exceed the context window of 64 tokens",
            ),
            (
                SamplingParameters {
                    top_logprobs: 21,
                    ..Default::default()
                },
                "parameters.top_logprobs",
            ),
            (
                SamplingParameters {
                    stop: vec![StopSequence { kind: None }],
                    ..Default::default()
                },
                "parameters.stop[0]: unknown stop-sequence type",
            ),
            (
                SamplingParameters {
                    stop: vec![StopSequence {
                        kind: Some(stop_sequence::Kind::Text(String::new())),
                    }],
                    ..Default::default()
                },
                "parameters.stop[0].text: must not be empty",
            ),
        ];
        for (p, want) in cases {
            let got = err(req(p));
            assert!(got.contains(want), "want `{want}` in `{got}`");
        }
    }

    #[test]
    fn prompts_are_checked() {
        let empty = GenerateRequest {
            input: Some(generate_request::Input::Prompt(String::new())),
            ..Default::default()
        };
        assert_eq!(err(empty), "prompt: must not be empty");
        assert_eq!(
            err(GenerateRequest::default()),
            "input: set `prompt` or `token_ids`"
        );
        let long = GenerateRequest {
            input: Some(generate_request::Input::Prompt("word ".repeat(100))),
            ..Default::default()
        };
        assert!(
            err(long).starts_with("prompt: 101 tokens do not fit the context window of 64 tokens")
        );
        let ids = GenerateRequest {
            input: Some(generate_request::Input::TokenIds(TokenIds {
                ids: vec![1, 49152],
            })),
            ..Default::default()
        };
        assert_eq!(
            err(ids),
            "token_ids.ids[1]: 49152 is outside the vocabulary of 49152 tokens"
        );
    }
}
