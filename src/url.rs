//! A provider base URL, split once at configure time into what Envoy needs per request.

#[allow(unused_imports)]
use crate::prelude::*;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseUrl {
    /// `https` (TLS to the upstream) or plain `http`.
    pub tls: bool,
    /// `host` or `host:port`, used as `:authority` and by the dynamic forward proxy.
    pub authority: String,
    /// Path prefix without trailing slash (may be empty).
    pub path: String,
}

impl BaseUrl {
    pub fn parse(raw: &str) -> Result<BaseUrl, String> {
        let raw = raw.trim();
        let (tls, rest) = if let Some(r) = raw.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = raw.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("url '{raw}' must start with http:// or https://"));
        };
        if rest.contains(['?', '#']) {
            return Err(format!("url '{raw}' must not contain a query or fragment"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains(['@', ' ']) {
            return Err(format!("url '{raw}' has no valid host"));
        }
        if let Some((_, port)) = authority.rsplit_once(':') {
            if !authority.ends_with(']') && port.parse::<u16>().is_err() {
                return Err(format!("url '{raw}' has an invalid port"));
            }
        }
        Ok(BaseUrl {
            tls,
            authority: authority.to_ascii_lowercase(),
            path: path.trim_end_matches('/').to_string(),
        })
    }

    /// Reads the serialized form (`tls`, `authority`, `path`), as the sidecar sends it.
    pub fn read(v: &serde_json::Value, at: &str) -> crate::read::Res<BaseUrl> {
        let o = crate::read::Obj::new(v, at, None)?;
        let tls = match o.req(&["tls"])? {
            serde_json::Value::Bool(b) => *b,
            other => return Err(crate::read::invalid(&o.at("tls"), other, "a boolean")),
        };
        o.finish(BaseUrl {
            tls,
            authority: o.string(&["authority"]),
            path: o.string(&["path"]),
        })
    }

    /// `base path + suffix`, where `suffix` starts with `/`.
    pub fn join(&self, suffix: &str) -> String {
        let mut s = String::with_capacity(self.path.len() + suffix.len());
        s.push_str(&self.path);
        s.push_str(suffix);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let u = BaseUrl::parse("https://API.openai.com/v1/").unwrap();
        assert!(u.tls);
        assert_eq!(u.authority, "api.openai.com");
        assert_eq!(u.join("/chat/completions"), "/v1/chat/completions");
        let u = BaseUrl::parse("http://127.0.0.1:8080").unwrap();
        assert!(!u.tls);
        assert_eq!(u.authority, "127.0.0.1:8080");
        assert_eq!(u.join("/x"), "/x");
        assert!(BaseUrl::parse("ftp://x").is_err());
        assert!(BaseUrl::parse("http://host:abc/").is_err());
        assert!(BaseUrl::parse("http:///x").is_err());
        assert!(BaseUrl::parse("http://h/x?y=1").is_err());
    }
}
