//! Reading the router's server-sent events.

/// Incremental SSE parser: feed it the body's chunks as they come (split anywhere, even
/// inside a line or a `\r\n`) and it returns the `data` of each complete event. Lines
/// end with `\n` or `\r\n`; several `data:` lines in one event are joined with `\n`;
/// comments (`:` lines) and other fields (`event:`, `id:`, `retry:`) are ignored.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: String,
    has_data: bool,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one chunk; appends the data of every event it completes to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<String>) {
        let mut rest = chunk;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.line.extend_from_slice(&rest[..i]);
            self.end_line(out);
            rest = &rest[i + 1..];
        }
        self.line.extend_from_slice(rest);
    }

    /// End of the body: an unterminated last event is dispatched anyway (lenient).
    pub fn finish(&mut self, out: &mut Vec<String>) {
        if !self.line.is_empty() {
            self.end_line(out);
        }
        self.dispatch(out);
    }

    fn end_line(&mut self, out: &mut Vec<String>) {
        let mut line = std::mem::take(&mut self.line);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line[0] == b':' {
            return; // comment
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (&line[..], &[][..]),
        };
        if field == b"data" {
            if self.has_data {
                self.data.push('\n');
            }
            self.data.push_str(&String::from_utf8_lossy(value));
            self.has_data = true;
        }
    }

    fn dispatch(&mut self, out: &mut Vec<String>) {
        if self.has_data {
            out.push(std::mem::take(&mut self.data));
            self.has_data = false;
        }
    }
}

/// What one SSE event of the completions stream means.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// `data: [DONE]`.
    Done,
    /// A choices event: how many tokens it carries (length of `token_ids`, summed over
    /// choices; a choice without `token_ids` but with non-empty `text` counts as one)
    /// and its `finish_reason` if any.
    Tokens {
        n: usize,
        finish_reason: Option<String>,
        /// The ids themselves, where the event carries `token_ids`.
        token_ids: Vec<u32>,
    },
    /// `{"error": {"message": ..}}`, or an event that is not valid JSON.
    Error(String),
}

pub fn parse_event(data: &str) -> StreamEvent {
    let data = data.trim();
    if data == "[DONE]" {
        return StreamEvent::Done;
    }
    let v: serde_json::Value = match serde_json::from_str(data) {
        Ok(v) => v,
        Err(e) => {
            let head: String = data.chars().take(80).collect();
            return StreamEvent::Error(format!("malformed stream event ({e}): {head}"));
        }
    };
    if let Some(err) = v.get("error") {
        let msg = match err.get("message").and_then(|m| m.as_str()) {
            Some(m) => m.to_string(),
            None => err.to_string(),
        };
        let kind = err.get("type").and_then(|t| t.as_str());
        return StreamEvent::Error(match kind {
            Some(k) => format!("{k}: {msg}"),
            None => msg,
        });
    }
    let mut n = 0;
    let mut finish_reason = None;
    let mut token_ids = Vec::new();
    if let Some(choices) = v.get("choices").and_then(|c| c.as_array()) {
        for c in choices {
            match c.get("token_ids").and_then(|t| t.as_array()) {
                Some(ids) => {
                    n += ids.len();
                    token_ids.extend(ids.iter().filter_map(|t| t.as_u64()).map(|t| t as u32));
                }
                None => {
                    if c.get("text")
                        .and_then(|t| t.as_str())
                        .is_some_and(|t| !t.is_empty())
                    {
                        n += 1;
                    }
                }
            }
            if let Some(r) = c.get("finish_reason").and_then(|r| r.as_str()) {
                finish_reason = Some(r.to_string());
            }
        }
    }
    StreamEvent::Tokens {
        n,
        finish_reason,
        token_ids,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(chunks: &[&[u8]]) -> Vec<String> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for c in chunks {
            p.push(c, &mut out);
        }
        p.finish(&mut out);
        out
    }

    const EV1: &str = r#"{"id":"cmpl-1","object":"text_completion","created":1,"model":"toy","choices":[{"index":0,"text":"a","token_ids":[12],"finish_reason":null}]}"#;
    const EV2: &str = r#"{"id":"cmpl-1","object":"text_completion","created":1,"model":"toy","choices":[{"index":0,"text":"bc","token_ids":[3,4],"finish_reason":"length"}]}"#;

    #[test]
    fn sse_parser_handles_any_split() {
        let body =
            format!("data: {EV1}\r\n\r\n: keep-alive comment\n\ndata: {EV2}\n\ndata: [DONE]\n\n");
        let bytes = body.as_bytes();
        let want = vec![EV1.to_string(), EV2.to_string(), "[DONE]".to_string()];
        assert_eq!(feed_all(&[bytes]), want);
        // Every two-way split, including inside "\r\n" and inside "data:".
        for i in 0..=bytes.len() {
            assert_eq!(feed_all(&[&bytes[..i], &bytes[i..]]), want, "split at {i}");
        }
        // One byte at a time.
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(feed_all(&singles), want);
        // Multi-line data, other fields ignored, missing final blank line tolerated.
        assert_eq!(
            feed_all(&[b"event: x\nid: 7\ndata:a\ndata: b\n\ndata: [DONE]"]),
            vec!["a\nb".to_string(), "[DONE]".to_string()]
        );
    }

    #[test]
    fn events_are_classified() {
        assert_eq!(
            parse_event(EV1),
            StreamEvent::Tokens {
                n: 1,
                finish_reason: None,
                token_ids: vec![12],
            }
        );
        assert_eq!(
            parse_event(EV2),
            StreamEvent::Tokens {
                n: 2,
                finish_reason: Some("length".into()),
                token_ids: vec![3, 4],
            }
        );
        assert_eq!(parse_event(" [DONE] "), StreamEvent::Done);
        let body = "data: {\"error\":{\"message\":\"decode worker lost\",\"type\":\"upstream_error\"}}\n\n";
        let evs = feed_all(&[&body.as_bytes()[..20], &body.as_bytes()[20..]]);
        assert_eq!(evs.len(), 1);
        assert_eq!(
            parse_event(&evs[0]),
            StreamEvent::Error("upstream_error: decode worker lost".into())
        );
        assert!(matches!(parse_event("{not json"), StreamEvent::Error(_)));
    }
}
