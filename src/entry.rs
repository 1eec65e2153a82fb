//! Entry: which gateway endpoint a request is for. Paths outside the gateway prefix are not ours.

#[allow(unused_imports)]
use crate::prelude::*;

use crate::api::Api;
use crate::error::GatewayError;

/// The gateway prefix; SDK base URLs `/openai/v1` and `/openai` both land under it.
pub const PREFIX: &str = "/openai";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Responses,
    Embeddings,
    Completions,
    ListModels,
    GetModel(String),
    /// Anthropic Messages (`/anthropic/v1/messages`).
    AnthropicMessages,
    /// Anthropic token counting (`/anthropic/v1/messages/count_tokens`).
    AnthropicCountTokens,
    /// Any other `/openai/v1/*` path, when the passthrough is enabled: the path after `/openai/v1`
    /// (query string included), forwarded to the provider untouched.
    Passthrough(String),
}

impl Endpoint {
    /// The OpenAI-style API a routed endpoint calls (`None` for models and the passthrough).
    pub fn api(&self) -> Option<Api> {
        match self {
            Endpoint::ChatCompletions => Some(Api::Chat),
            Endpoint::Responses => Some(Api::Responses),
            Endpoint::Embeddings => Some(Api::Embeddings),
            Endpoint::Completions => Some(Api::Completions),
            _ => None,
        }
    }
}

/// The Anthropic ingress prefix: an Anthropic SDK with `base_url="http://gateway/anthropic"` calls
/// `/anthropic/v1/messages`; `/anthropic/messages` is accepted too.
pub const ANTHROPIC_PREFIX: &str = "/anthropic";

/// Whether a path is under the Anthropic ingress (its errors are Anthropic-shaped).
pub fn is_anthropic(path: &str) -> bool {
    under(path, ANTHROPIC_PREFIX).is_some()
}

/// `path` up to its query or fragment (a byte scan: `split(['?', '#'])` steps through chars).
fn without_query(path: &str) -> &str {
    let end = path
        .bytes()
        .position(|b| b == b'?' || b == b'#')
        .unwrap_or(path.len());
    path.get(..end).unwrap_or(path)
}

/// The rest of `path` (without query) under `prefix` and an optional `/v1`, without trailing `/`.
fn under<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let path = without_query(path);
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
                path: without_query(path).to_string(),
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
    classify_with(method, path, false)
}

/// [`classify`], with the passthrough of other `/openai/v1/*` paths on or off.
pub fn classify_with(
    method: &str,
    full_path: &str,
    passthrough: bool,
) -> Option<Result<Endpoint, GatewayError>> {
    if let Some(r) = classify_anthropic(method, full_path) {
        return Some(r);
    }
    let path = without_query(full_path);
    let rest = under(path, PREFIX)?;
    let (endpoint, allow) = match rest {
        "/chat/completions" => (Endpoint::ChatCompletions, "POST"),
        "/responses" => (Endpoint::Responses, "POST"),
        "/embeddings" => (Endpoint::Embeddings, "POST"),
        "/completions" => (Endpoint::Completions, "POST"),
        "/models" => (Endpoint::ListModels, "GET"),
        _ => match rest.strip_prefix("/models/") {
            Some(id) if !id.is_empty() => (Endpoint::GetModel(percent_decode(id)), "GET"),
            _ if passthrough && passthrough_path_ok(rest) => {
                // The client's path after the prefix, query included (fragments never reach us).
                let tail = full_path.strip_prefix(PREFIX).unwrap_or_default();
                let tail = tail
                    .strip_prefix("/v1")
                    .filter(|r| r.starts_with('/'))
                    .unwrap_or(tail);
                return Some(Ok(Endpoint::Passthrough(tail.to_string())));
            }
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

/// A passthrough path: a non-empty `/segment/...` without dot segments or encoded slashes.
fn passthrough_path_ok(rest: &str) -> bool {
    rest.len() > 1
        && rest.starts_with('/')
        && rest
            .split('/')
            .skip(1)
            .all(|seg| !seg.is_empty() && seg != "." && seg != ".." && !seg.contains('%'))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| core::str::from_utf8(h).ok());
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
    fn passthrough_only_when_enabled() {
        use Endpoint::*;
        assert_eq!(
            classify_with("POST", "/openai/v1/images/generations?a=b", true),
            Some(Ok(Passthrough("/images/generations?a=b".into())))
        );
        assert_eq!(
            classify_with("DELETE", "/openai/files/file-1", true),
            Some(Ok(Passthrough("/files/file-1".into())))
        );
        assert_eq!(
            classify_with("POST", "/openai/v1/images/generations", false)
                .unwrap()
                .unwrap_err()
                .status(),
            404
        );
        for bad in [
            "/openai/v1/../admin",
            "/openai/v1/a//b",
            "/openai/v1/a%2Fb",
            "/openai/v1",
        ] {
            assert!(classify_with("GET", bad, true).unwrap().is_err(), "{bad}");
        }
        // Known endpoints keep their methods.
        assert_eq!(
            classify_with("GET", "/openai/v1/embeddings", true)
                .unwrap()
                .unwrap_err()
                .status(),
            405
        );
    }

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
        assert_eq!(
            classify("POST", "/openai/v1/responses"),
            Some(Ok(Responses))
        );
        assert_eq!(classify("POST", "/openai/embeddings"), Some(Ok(Embeddings)));
        assert_eq!(
            classify("POST", "/openai/v1/completions"),
            Some(Ok(Completions))
        );
        assert_eq!(
            classify("GET", "/openai/v1/responses")
                .unwrap()
                .unwrap_err()
                .status(),
            405
        );
        assert_eq!(Responses.api(), Some(Api::Responses));
        assert_eq!(ListModels.api(), None);
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
            classify("GET", "/openai/v1/audio/speech")
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
