//! Entry: which gateway endpoint a request is for. Paths outside the gateway prefix are not ours.

use crate::error::GatewayError;

/// The gateway prefix; SDK base URLs `/openai/v1` and `/openai` both land under it.
pub const PREFIX: &str = "/openai";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    ListModels,
    GetModel(String),
    /// Anthropic Messages (`/anthropic/v1/messages`).
    AnthropicMessages,
    /// Anthropic token counting (`/anthropic/v1/messages/count_tokens`).
    AnthropicCountTokens,
}

/// The Anthropic ingress prefix: an Anthropic SDK with `base_url="http://gateway/anthropic"` calls
/// `/anthropic/v1/messages`; `/anthropic/messages` is accepted too.
pub const ANTHROPIC_PREFIX: &str = "/anthropic";

/// Whether a path is under the Anthropic ingress (its errors are Anthropic-shaped).
pub fn is_anthropic(path: &str) -> bool {
    under(path, ANTHROPIC_PREFIX).is_some()
}

/// The rest of `path` (without query) under `prefix` and an optional `/v1`, without trailing `/`.
fn under<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let rest = path.strip_prefix(prefix)?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let rest = rest
        .strip_prefix("/v1")
        .filter(|r| r.is_empty() || r.starts_with('/'))
        .unwrap_or(rest);
    Some(rest.trim_end_matches('/'))
}

fn classify_anthropic(method: &str, path: &str) -> Option<Result<Endpoint, GatewayError>> {
    let rest = under(path, ANTHROPIC_PREFIX)?;
    let endpoint = match rest {
        "/messages" => Endpoint::AnthropicMessages,
        "/messages/count_tokens" => Endpoint::AnthropicCountTokens,
        _ => {
            return Some(Err(GatewayError::UnknownEndpoint {
                path: path
                    .split(['?', '#'])
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            }))
        }
    };
    if method != "POST" {
        return Some(Err(GatewayError::MethodNotAllowed {
            method: method.to_string(),
            allow: "POST",
        }));
    }
    Some(Ok(endpoint))
}

/// `None`: not a gateway path, let it through untouched. `Some(Err)`: a gateway path we refuse.
pub fn classify(method: &str, path: &str) -> Option<Result<Endpoint, GatewayError>> {
    if let Some(r) = classify_anthropic(method, path) {
        return Some(r);
    }
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let rest = path.strip_prefix(PREFIX)?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let rest = rest
        .strip_prefix("/v1")
        .filter(|r| r.is_empty() || r.starts_with('/'))
        .unwrap_or(rest);
    let rest = rest.trim_end_matches('/');
    let (endpoint, allow) = match rest {
        "/chat/completions" => (Endpoint::ChatCompletions, "POST"),
        "/models" => (Endpoint::ListModels, "GET"),
        _ => match rest.strip_prefix("/models/") {
            Some(id) if !id.is_empty() => (Endpoint::GetModel(percent_decode(id)), "GET"),
            _ => {
                return Some(Err(GatewayError::UnknownEndpoint {
                    path: path.to_string(),
                }))
            }
        },
    };
    let method_ok = method == allow || (allow == "GET" && method == "HEAD");
    if !method_ok {
        return Some(Err(GatewayError::MethodNotAllowed {
            method: method.to_string(),
            allow,
        }));
    }
    Some(Ok(endpoint))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_paths() {
        use Endpoint::*;
        assert_eq!(
            classify("POST", "/openai/v1/chat/completions"),
            Some(Ok(ChatCompletions))
        );
        assert_eq!(
            classify("POST", "/openai/chat/completions"),
            Some(Ok(ChatCompletions))
        );
        assert_eq!(
            classify("POST", "/openai/v1/chat/completions?x=1"),
            Some(Ok(ChatCompletions))
        );
        assert_eq!(classify("GET", "/openai/v1/models"), Some(Ok(ListModels)));
        assert_eq!(classify("GET", "/openai/models"), Some(Ok(ListModels)));
        assert_eq!(
            classify("GET", "/openai/v1/models/llama3.1%3A8b"),
            Some(Ok(GetModel("llama3.1:8b".into())))
        );
        assert_eq!(classify("GET", "/health"), None);
        assert_eq!(
            classify("POST", "/anthropic/v1/messages"),
            Some(Ok(AnthropicMessages))
        );
        assert_eq!(
            classify("POST", "/anthropic/messages?beta=true"),
            Some(Ok(AnthropicMessages))
        );
        assert_eq!(
            classify("POST", "/anthropic/v1/messages/count_tokens"),
            Some(Ok(AnthropicCountTokens))
        );
        assert_eq!(classify("POST", "/anthropicX/v1/messages"), None);
        assert!(is_anthropic("/anthropic/v1/nope"));
        assert!(!is_anthropic("/openai/v1/messages"));
        assert_eq!(
            classify("POST", "/anthropic/v1/complete")
                .unwrap()
                .unwrap_err()
                .status(),
            404
        );
        assert_eq!(
            classify("GET", "/anthropic/v1/messages")
                .unwrap()
                .unwrap_err()
                .status(),
            405
        );
        assert_eq!(classify("GET", "/openaiX/v1/models"), None);
        assert_eq!(
            classify("GET", "/openai/v1/embeddings")
                .unwrap()
                .unwrap_err()
                .status(),
            404
        );
        assert_eq!(
            classify("GET", "/openai").unwrap().unwrap_err().status(),
            404
        );
        assert_eq!(
            classify("GET", "/openai/v1/chat/completions")
                .unwrap()
                .unwrap_err()
                .status(),
            405
        );
        assert_eq!(
            classify("DELETE", "/openai/v1/models")
                .unwrap()
                .unwrap_err()
                .status(),
            405
        );
    }
}
