//! The OpenAI-compatible request and its validation: every refusal names the field at fault.

use std::borrow::Cow;
use std::time::Duration;

use axum::body::Bytes;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::tokenizer;

#[derive(Clone, Debug, PartialEq)]
pub struct CompletionRequest {
    pub prompt: Vec<u32>,
    /// The prompt came as text: the response carries text too.
    pub text_prompt: bool,
    pub max_tokens: usize,
    pub temperature: f32,
    pub seed: u64,
    pub stream: bool,
}

#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<Cow<'static, str>>,
    pub kind: &'static str,
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn invalid(param: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param.into()),
            kind: "invalid_request_error",
            retry_after_s: None,
        }
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: message.into(),
            param: None,
            kind: "rate_limit_error",
            retry_after_s: Some(1),
        }
    }

    pub fn upstream(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_GATEWAY,
            message: message.into(),
            param: None,
            kind: "server_error",
            retry_after_s: None,
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            param: None,
            kind: "server_error",
            retry_after_s: Some(1),
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": null}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after_s {
            resp.headers_mut().insert(header::RETRY_AFTER, s.into());
        }
        resp
    }
}

/// What the served model accepts.
#[derive(Clone, Debug)]
pub struct ModelLimits {
    pub name: String,
    pub vocab_size: usize,
    pub max_seq_len: usize,
}

/// The fields a completion request may carry.
const SUPPORTED: [&str; 7] = [
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "seed",
    "stream",
    "n",
];

/// Fields of the OpenAI API that pdfleet does not implement, accepted only with the value that
/// changes nothing (null, or the API's default); any other value is refused by name rather
/// than silently ignored.
fn harmless(field: &str, v: &Value) -> bool {
    let zero = |v: &Value| v.as_f64() == Some(0.0);
    v.is_null()
        || match field {
            "user" => v.is_string(),
            "top_p" => v.as_f64() == Some(1.0),
            "best_of" => v.as_u64() == Some(1),
            "frequency_penalty" | "presence_penalty" => zero(v),
            "echo" => v == &Value::Bool(false),
            "stop" => v.as_array().is_some_and(|a| a.is_empty()),
            "logit_bias" => v.as_object().is_some_and(|o| o.is_empty()),
            _ => false,
        }
}

/// The size of a request body above which the router answers 413 without reading on.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// Reads a request body within its deadline and size limit; a body that is too large, late
/// or broken off is refused in the API's error shape (413, 408, 400).
pub async fn read_body(body: axum::body::Body, within: Duration) -> Result<Bytes, ApiError> {
    let refused = |status, message: String| ApiError {
        status,
        ..ApiError::invalid("body", message)
    };
    match tokio::time::timeout(within, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            let e = e.into_inner();
            Err(if e.is::<http_body_util::LengthLimitError>() {
                refused(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body is over {MAX_BODY_BYTES} bytes"),
                )
            } else {
                refused(
                    StatusCode::BAD_REQUEST,
                    format!("request body could not be read: {e}"),
                )
            })
        }
        Err(_) => Err(refused(
            StatusCode::REQUEST_TIMEOUT,
            format!("request body not received within {} s", within.as_secs()),
        )),
    }
}

pub fn parse(body: &[u8], limits: &ModelLimits) -> Result<CompletionRequest, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("request body is not valid JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::invalid("body", "request body must be a JSON object"))?;
    let mut unsupported: Vec<&String> = obj
        .iter()
        .filter(|(k, v)| !SUPPORTED.contains(&k.as_str()) && !harmless(k, v))
        .map(|(k, _)| k)
        .collect();
    if !unsupported.is_empty() {
        unsupported.sort();
        let names: Vec<&str> = unsupported.iter().map(|k| k.as_str()).collect();
        return Err(ApiError::invalid(
            unsupported[0].clone(),
            format!(
                "not supported by this server: {} (it serves {})",
                names.join(", "),
                SUPPORTED.join(", ")
            ),
        ));
    }
    if let Some(m) = obj.get("model") {
        let m = m
            .as_str()
            .ok_or_else(|| ApiError::invalid("model", "model must be a string"))?;
        if m != limits.name {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "model {m:?} is not served here; this pool serves {:?}",
                    limits.name
                ),
                param: Some("model".into()),
                kind: "invalid_request_error",
                retry_after_s: None,
            });
        }
    }
    if let Some(n) = obj.get("n") {
        if n.as_u64() != Some(1) {
            return Err(ApiError::invalid("n", "only n = 1 is supported"));
        }
    }
    let (prompt, text_prompt) = match obj.get("prompt") {
        None => return Err(ApiError::invalid("prompt", "prompt is required")),
        Some(Value::String(s)) => (
            tokenizer::encode(s, limits.vocab_size).map_err(|e| ApiError::invalid("prompt", e))?,
            true,
        ),
        Some(Value::Array(items)) => {
            let ids = items
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_u64() {
                    Some(id) if (id as usize) < limits.vocab_size => Ok(id as u32),
                    Some(id) => Err(ApiError::invalid(
                        "prompt",
                        format!("token id {id} at {i} is outside the vocabulary (0..{})", limits.vocab_size),
                    )),
                    None => Err(ApiError::invalid("prompt", format!("prompt[{i}] must be a token id (a non-negative integer); batches are not supported"))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            (ids, false)
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "prompt",
                "prompt must be a string or an array of token ids",
            ))
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "prompt is empty"));
    }
    if prompt.len() >= limits.max_seq_len {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "prompt is too long: {} tokens, and the model's context is {}",
                prompt.len(),
                limits.max_seq_len
            ),
        ));
    }
    let room = limits.max_seq_len - prompt.len();
    let max_tokens = match obj.get("max_tokens") {
        None | Some(Value::Null) => 16.min(room),
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 && n as usize <= room => n as usize,
            _ => {
                return Err(ApiError::invalid(
                    "max_tokens",
                    format!("max_tokens must be an integer from 1 to {room} (the context left after a {}-token prompt)", prompt.len()),
                ))
            }
        },
    };
    let temperature = match obj.get("temperature") {
        None | Some(Value::Null) => 0.0,
        Some(v) => match v.as_f64() {
            Some(t) if (0.0..=2.0).contains(&t) => t as f32,
            _ => {
                return Err(ApiError::invalid(
                    "temperature",
                    "temperature must be a number from 0 to 2 (0 is greedy)",
                ))
            }
        },
    };
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_u64()
            .ok_or_else(|| ApiError::invalid("seed", "seed must be a non-negative integer"))?,
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| ApiError::invalid("stream", "stream must be true or false"))?,
    };
    Ok(CompletionRequest {
        prompt,
        text_prompt,
        max_tokens,
        temperature,
        seed,
        stream,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ModelLimits {
        ModelLimits {
            name: "toy".into(),
            vocab_size: 100,
            max_seq_len: 64,
        }
    }

    fn err(body: &str) -> (StatusCode, Option<String>, String) {
        let e = parse(body.as_bytes(), &limits()).unwrap_err();
        (
            e.status,
            e.param.as_deref().map(|p| p.to_string()),
            e.message,
        )
    }

    #[test]
    fn accepts_text_and_token_prompts() {
        let r = parse(
            br#"{"model":"toy","prompt":"ab","max_tokens":3,"stream":true}"#,
            &limits(),
        )
        .unwrap();
        assert_eq!(
            (r.prompt, r.text_prompt, r.max_tokens, r.stream),
            (vec![65, 66], true, 3, true)
        );
        let r = parse(
            br#"{"prompt":[1,2,3],"temperature":0.7,"seed":9}"#,
            &limits(),
        )
        .unwrap();
        assert_eq!(
            (r.prompt, r.text_prompt, r.max_tokens, r.temperature, r.seed),
            (vec![1, 2, 3], false, 16, 0.7, 9)
        );
    }

    #[test]
    fn refusals_name_the_field() {
        assert_eq!(err("{nope").1.as_deref(), Some("body"));
        assert!(err("{nope").2.contains("not valid JSON"));
        assert_eq!(err(r#"{"max_tokens":3}"#).1.as_deref(), Some("prompt"));
        assert_eq!(err(r#"{"prompt":""}"#).2, "prompt is empty");
        assert!(err(r#"{"prompt":[1,100]}"#)
            .2
            .contains("token id 100 at 1 is outside the vocabulary"));
        assert_eq!(err(r#"{"prompt":[[1]]}"#).1.as_deref(), Some("prompt"));
        assert!(err(&format!(r#"{{"prompt":{:?}}}"#, vec![1u32; 64]))
            .2
            .contains("prompt is too long: 64 tokens"));
        assert_eq!(
            err(r#"{"prompt":[1],"max_tokens":0}"#).1.as_deref(),
            Some("max_tokens")
        );
        assert!(err(r#"{"prompt":[1],"max_tokens":64}"#)
            .2
            .contains("from 1 to 63"));
        assert_eq!(
            err(r#"{"prompt":[1],"temperature":-1}"#).1.as_deref(),
            Some("temperature")
        );
        assert_eq!(
            err(r#"{"prompt":[1],"stream":"yes"}"#).1.as_deref(),
            Some("stream")
        );
        assert_eq!(err(r#"{"prompt":[1],"n":2}"#).1.as_deref(), Some("n"));
        let (status, param, _) = err(r#"{"model":"gpt","prompt":[1]}"#);
        assert_eq!(
            (status, param.as_deref()),
            (StatusCode::NOT_FOUND, Some("model"))
        );
        assert!(err(r#"{"prompt":"é"}"#)
            .2
            .contains("outside the toy tokenizer's alphabet"));
    }

    #[test]
    fn unsupported_fields_are_refused_by_name_unless_they_change_nothing() {
        let (status, param, message) =
            err(r#"{"prompt":[1],"stop":["x"],"logprobs":2,"top_p":0.9}"#);
        assert_eq!(
            (status, param.as_deref()),
            (StatusCode::BAD_REQUEST, Some("logprobs"))
        );
        assert!(
            message.contains("not supported by this server: logprobs, stop, top_p"),
            "{message}"
        );
        assert_eq!(
            err(r#"{"prompt":[1],"max_token":5}"#).1.as_deref(),
            Some("max_token")
        );
        assert_eq!(
            err(r#"{"prompt":[1],"echo":true}"#).1.as_deref(),
            Some("echo")
        );
        // The defaults, null, and a user tag change nothing.
        parse(
            br#"{"prompt":[1],"top_p":1,"stop":[],"logprobs":null,"echo":false,"best_of":1,
                "frequency_penalty":0,"presence_penalty":0.0,"logit_bias":{},"user":"u-1"}"#,
            &limits(),
        )
        .unwrap();
    }
}
