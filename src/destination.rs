//! Where a provider URL may point: the destination policy against SSRF (issue 9, item 4).
//!
//! One pure module, used by the sidecar's providers API (refuses the registration with 400) and by the
//! filter (refuses to route a request there). The policy, written down in `docs/security.md`:
//!
//! * **Never allowed** (no allow-list entry changes this): URLs with control characters, spaces, CR/LF or
//!   non-ASCII bytes; user-info (`user@host`); non-canonical IPv4 forms (`2130706433`, `0x7f.0.0.1`,
//!   `0177.0.0.1`, `127.1`, trailing dots); IPv6 zone ids; IPv4-mapped / IPv4-compatible / NAT64 IPv6
//!   addresses (`[::ffff:127.0.0.1]`); the unspecified addresses (`0.0.0.0`, `0/8`, `[::]`); cloud metadata
//!   endpoints (`169.254.169.254`, `169.254.170.2`, `100.100.100.200`, `[fd00:ec2::254]`,
//!   `metadata.google.internal`, `metadata`, `instance-data`, ...); broadcast and multicast.
//! * **Only when the operator allow-list names them**: loopback (`127/8`, `[::1]`, `localhost`,
//!   `*.localhost`) and link-local (`169.254/16`, `[fe80::/10]`). These are where the sidecar's `/internal`,
//!   Envoy's admin port and node agents listen.
//! * **Private ranges** (`10/8`, `172.16/12`, `192.168/16`, `100.64/10`, `[fc00::/7]`): allowed for hosted
//!   providers (models served inside the cluster), for SaaS providers only when allow-listed.
//! * Everything else (public addresses and host names) is allowed. Host names are checked as written: the
//!   gateway does not resolve them here, so a public name pointing at a private address is the network
//!   policy's job (egress rules), as documented.
//!
//! The allow-list is one string of entries separated by commas or white space (the sidecar reads it from
//! `LLM_GATEWAY_ALLOWED_DESTINATIONS`, the filter from its settings). An entry is a host name (`vllm.svc`),
//! a wildcard suffix (`*.svc.cluster.local`), an address (`127.0.0.1`, `[::1]`) or a CIDR (`10.0.0.0/8`,
//! `[fd00::/8]`), each optionally followed by `:port` (without a port, any port matches).

#[allow(unused_imports)]
use crate::prelude::*;

use core::net::{Ipv4Addr, Ipv6Addr};

/// The environment variable holding the sidecar's allow-list.
pub const ALLOW_ENV: &str = "LLM_GATEWAY_ALLOWED_DESTINATIONS";

/// The host part of a URL, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    V4(Ipv4Addr),
    V6(Ipv6Addr),
    /// A lower-cased DNS name.
    Name(String),
}

/// How a destination is treated before the allow-list is consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Public,
    /// Allowed for hosted providers; SaaS providers need an allow-list entry.
    Private,
    /// Loopback and link-local: allowed only by an allow-list entry.
    Restricted,
}

/// A parsed destination: scheme, host, port (explicit or the scheme's default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub tls: bool,
    pub host: Host,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Name(String),
    Suffix(String),
    V4 { net: u32, bits: u8 },
    V6 { net: u128, bits: u8 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    pattern: Pattern,
    port: Option<u16>,
}

/// The operator allow-list. The default (empty) policy allows public destinations, and private ones for
/// hosted providers only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Policy {
    /// Parses an allow-list (see the module documentation). Empty input gives the default policy.
    pub fn parse(spec: &str) -> Result<Policy, String> {
        let mut rules = Vec::new();
        for entry in spec.split(|c: char| c == ',' || c.is_whitespace()) {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            rules.push(parse_rule(entry).map_err(|e| format!("allow-list entry '{entry}': {e}"))?);
        }
        Ok(Policy { rules })
    }

    /// True when no entry is configured.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Checks a provider base URL (`http(s)://authority/path`). `hosted` is true for providers serving
    /// models inside the deployment (they may use private addresses).
    pub fn check_url(&self, url: &str, hosted: bool) -> Result<Destination, String> {
        let dest = parse_url(url)?;
        self.check(&dest, hosted)?;
        Ok(dest)
    }

    /// Checks an already parsed destination.
    pub fn check(&self, dest: &Destination, hosted: bool) -> Result<(), String> {
        let class = classify(&dest.host)?;
        let allowed = || self.allows(&dest.host, dest.port);
        match class {
            Class::Public => Ok(()),
            Class::Private if hosted || allowed() => Ok(()),
            Class::Restricted if allowed() => Ok(()),
            Class::Private => Err(format!(
                "destination {} is a private address: only hosted providers may use it unless the operator \
                 allow-list ({ALLOW_ENV}) names it",
                show(&dest.host)
            )),
            Class::Restricted => Err(format!(
                "destination {} is a loopback or link-local address: refused unless the operator allow-list \
                 ({ALLOW_ENV}) names it",
                show(&dest.host)
            )),
        }
    }

    fn allows(&self, host: &Host, port: u16) -> bool {
        self.rules.iter().any(|r| {
            r.port.is_none_or(|p| p == port)
                && match (&r.pattern, host) {
                    (Pattern::Name(n), Host::Name(h)) => n == h,
                    (Pattern::Suffix(s), Host::Name(h)) => {
                        h.len() > s.len() && h.ends_with(s.as_str())
                    }
                    (Pattern::V4 { net, bits }, Host::V4(a)) => {
                        in_net(u32::from(*a).into(), (*net).into(), *bits, 32)
                    }
                    (Pattern::V6 { net, bits }, Host::V6(a)) => {
                        in_net(u128::from(*a), *net, *bits, 128)
                    }
                    _ => false,
                }
        })
    }
}

fn in_net(addr: u128, net: u128, bits: u8, width: u8) -> bool {
    if bits == 0 {
        return true;
    }
    let shift = u32::from(width.saturating_sub(bits));
    addr.checked_shr(shift) == net.checked_shr(shift)
}

fn show(host: &Host) -> String {
    match host {
        Host::V4(a) => a.to_string(),
        Host::V6(a) => format!("[{a}]"),
        Host::Name(n) => n.clone(),
    }
}

/// Refuses any control character, space, DEL or non-ASCII byte anywhere in the URL.
fn check_chars(s: &str) -> Result<(), String> {
    if let Some(c) = s.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "url contains a forbidden character ({}): control characters, spaces and non-ASCII are refused",
            c.escape_default()
        ));
    }
    Ok(())
}

/// Parses `http(s)://authority[/path]` strictly.
pub fn parse_url(url: &str) -> Result<Destination, String> {
    check_chars(url)?;
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err("url must start with http:// or https://".into());
    };
    let authority = match rest.find(['/', '?', '#']) {
        Some(i) => rest.get(..i).unwrap_or(rest),
        None => rest,
    };
    if rest.contains(['?', '#']) {
        return Err("url must not contain a query or fragment".into());
    }
    if authority.contains(['@', '\\']) {
        return Err("url must not contain user information".into());
    }
    let (host, port) = split_host_port(authority)?;
    let port = match port {
        Some(p) => p,
        None if tls => 443,
        None => 80,
    };
    if port == 0 {
        return Err("url port 0 is not a destination".into());
    }
    Ok(Destination {
        tls,
        host: parse_host(host)?,
        port,
    })
}

/// Splits `host[:port]` / `[v6][:port]`; the host keeps its brackets.
fn split_host_port(authority: &str) -> Result<(&str, Option<u16>), String> {
    let (host, port) = if authority.starts_with('[') {
        match authority.find(']') {
            Some(i) => {
                let (h, rest) = authority.split_at(i + 1);
                match rest.strip_prefix(':') {
                    Some(p) => (h, Some(p)),
                    None if rest.is_empty() => (h, None),
                    None => return Err(format!("'{authority}' is not a valid host")),
                }
            }
            None => return Err(format!("'{authority}' is not a valid host")),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("url has no host".into());
    }
    let port = match port {
        None => None,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.len() <= 5 => Some(
            p.parse::<u16>()
                .map_err(|_| format!("port '{p}' is out of range"))?,
        ),
        Some(p) => return Err(format!("port '{p}' is not a number")),
    };
    Ok((host, port))
}

/// Parses a host: a bracketed IPv6 literal, a canonical dotted-quad IPv4, or a DNS name. Anything a URL
/// parser or resolver could read as a number in another form is refused.
pub fn parse_host(host: &str) -> Result<Host, String> {
    check_chars(host)?;
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| format!("'{host}' is not a valid IPv6 literal"))?;
        if inner.contains('%') {
            return Err(format!("'{host}': IPv6 zone ids are refused"));
        }
        let a: Ipv6Addr = inner
            .parse()
            .map_err(|_| format!("'{host}' is not a valid IPv6 literal"))?;
        return Ok(Host::V6(a));
    }
    let lower = host.to_ascii_lowercase();
    if lower.ends_with('.') {
        return Err(format!(
            "'{host}': host names with a trailing dot are refused"
        ));
    }
    let labels: Vec<&str> = lower.split('.').collect();
    // A WHATWG URL parser reads a host whose last label is a number (decimal, 0x-hex or octal) as IPv4.
    let last_numeric = labels.last().is_some_and(|l| looks_numeric(l));
    if last_numeric {
        return match strict_ipv4(&labels) {
            Some(a) => Ok(Host::V4(a)),
            None => Err(format!(
                "'{host}' is a non-canonical IPv4 form (decimal, octal, hex or short): write the dotted quad"
            )),
        };
    }
    for label in &labels {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!("'{host}' is not a valid host name"));
        }
    }
    if lower.len() > 253 {
        return Err(format!("'{host}' is too long for a host name"));
    }
    Ok(Host::Name(lower))
}

fn looks_numeric(label: &str) -> bool {
    if label.is_empty() {
        return false;
    }
    if let Some(hex) = label.strip_prefix("0x") {
        return hex.bytes().all(|b| b.is_ascii_hexdigit());
    }
    label.bytes().all(|b| b.is_ascii_digit())
}

fn strict_ipv4(labels: &[&str]) -> Option<Ipv4Addr> {
    if labels.len() != 4 {
        return None;
    }
    let mut octets = [0u8; 4];
    for (o, l) in octets.iter_mut().zip(labels) {
        if l.is_empty()
            || l.len() > 3
            || !l.bytes().all(|b| b.is_ascii_digit())
            || (l.len() > 1 && l.starts_with('0'))
        {
            return None;
        }
        *o = l.parse().ok()?;
    }
    Some(Ipv4Addr::from(octets))
}

const METADATA_NAMES: &[&str] = &[
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "metadata.azure.com",
    "instance-data",
    "instance-data.ec2.internal",
    "metadata.tencentyun.com",
    "metadata.platformequinix.com",
];

const METADATA_V4: &[Ipv4Addr] = &[
    Ipv4Addr::new(169, 254, 169, 254), // AWS, GCP, Azure, OpenStack, DigitalOcean, ...
    Ipv4Addr::new(169, 254, 170, 2),   // AWS ECS task metadata
    Ipv4Addr::new(169, 254, 169, 123), // AWS time sync
    Ipv4Addr::new(100, 100, 100, 200), // Alibaba Cloud
    Ipv4Addr::new(192, 0, 0, 192),     // Oracle Cloud
];

/// Classifies a host; `Err` for destinations no allow-list can permit.
pub fn classify(host: &Host) -> Result<Class, String> {
    match host {
        Host::Name(n) => {
            if METADATA_NAMES.contains(&n.as_str()) {
                return Err(format!("'{n}' is a cloud metadata endpoint"));
            }
            if n == "localhost" || n.ends_with(".localhost") {
                return Ok(Class::Restricted);
            }
            Ok(Class::Public)
        }
        Host::V4(a) => classify_v4(*a),
        Host::V6(a) => classify_v6(*a),
    }
}

fn classify_v4(a: Ipv4Addr) -> Result<Class, String> {
    let o = a.octets();
    if METADATA_V4.contains(&a) {
        return Err(format!("{a} is a cloud metadata endpoint"));
    }
    if o[0] == 0 {
        return Err(format!("{a} is an unspecified ('this network') address"));
    }
    if a.is_broadcast() || a.is_multicast() || o[0] >= 240 {
        return Err(format!("{a} is a broadcast, multicast or reserved address"));
    }
    if a.is_loopback() || a.is_link_local() {
        return Ok(Class::Restricted);
    }
    // 100.64.0.0/10: carrier-grade NAT, used for pod and service ranges.
    let cgnat = o[0] == 100 && (o[1] & 0xC0) == 64;
    if a.is_private() || cgnat {
        return Ok(Class::Private);
    }
    Ok(Class::Public)
}

fn classify_v6(a: Ipv6Addr) -> Result<Class, String> {
    let seg = a.segments();
    if a.is_unspecified() {
        return Err(format!("[{a}] is the unspecified address"));
    }
    if a == Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x254) {
        return Err(format!("[{a}] is a cloud metadata endpoint"));
    }
    if a.is_loopback() {
        return Ok(Class::Restricted);
    }
    // IPv4-mapped (::ffff:0:0/96), IPv4-compatible (::/96) and NAT64 (64:ff9b::/96) embed an IPv4 address:
    // refused so that no IPv4 check can be bypassed through them.
    let embeds_v4 = (seg[..5] == [0, 0, 0, 0, 0] && (seg[5] == 0xffff || seg[5] == 0))
        || (seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6] == [0, 0, 0, 0]);
    if embeds_v4 {
        return Err(format!(
            "[{a}] embeds an IPv4 address: write the IPv4 address itself"
        ));
    }
    if a.is_multicast() {
        return Err(format!("[{a}] is a multicast address"));
    }
    if (seg[0] & 0xffc0) == 0xfe80 {
        return Ok(Class::Restricted);
    }
    if (seg[0] & 0xfe00) == 0xfc00 {
        return Ok(Class::Private);
    }
    Ok(Class::Public)
}

fn parse_rule(entry: &str) -> Result<Rule, String> {
    check_chars(entry)?;
    // `[v6]`, `[v6/len]`, `[v6]:port`, `[v6/len]:port`
    if let Some(rest) = entry.strip_prefix('[') {
        let (inner, after) = rest.split_once(']').ok_or("unclosed '['")?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(parse_port(p)?),
            None if after.is_empty() => None,
            None => return Err("unexpected text after ']'".into()),
        };
        let (addr, bits) = split_prefix(inner, 128)?;
        let a: Ipv6Addr = addr
            .parse()
            .map_err(|_| format!("'{addr}' is not an IPv6 address"))?;
        let net = mask(u128::from(a), bits, 128);
        return Ok(Rule {
            pattern: Pattern::V6 { net, bits },
            port,
        });
    }
    let (body, port) = match entry.rsplit_once(':') {
        Some((b, p)) => (b, Some(parse_port(p)?)),
        None => (entry, None),
    };
    if let Some(suffix) = body.strip_prefix("*.") {
        let Host::Name(n) = parse_host(suffix)? else {
            return Err("a wildcard needs a host name suffix".into());
        };
        return Ok(Rule {
            pattern: Pattern::Suffix(format!(".{n}")),
            port,
        });
    }
    let (addr, bits) = split_prefix(body, 32)?;
    match parse_host(addr)? {
        Host::V4(a) => Ok(Rule {
            pattern: Pattern::V4 {
                net: mask(u32::from(a).into(), bits, 32) as u32,
                bits,
            },
            port,
        }),
        Host::Name(n) if bits == 32 && !body.contains('/') => Ok(Rule {
            pattern: Pattern::Name(n),
            port,
        }),
        _ => Err("a prefix length needs an IP address".into()),
    }
}

fn parse_port(p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("'{p}' is not a port")),
        Ok(n) => Ok(n),
    }
}

fn split_prefix(s: &str, width: u8) -> Result<(&str, u8), String> {
    match s.split_once('/') {
        None => Ok((s, width)),
        Some((a, b)) => match b.parse::<u8>() {
            Ok(n) if n <= width && !b.starts_with('+') => Ok((a, n)),
            _ => Err(format!("'{b}' is not a prefix length")),
        },
    }
}

fn mask(addr: u128, bits: u8, width: u8) -> u128 {
    if bits == 0 {
        return 0;
    }
    let shift = u32::from(width.saturating_sub(bits));
    addr.checked_shr(shift)
        .and_then(|v| v.checked_shl(shift))
        .unwrap_or(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saas(p: &Policy, url: &str) -> Result<Destination, String> {
        p.check_url(url, false)
    }

    #[test]
    fn public_destinations_pass() {
        let p = Policy::default();
        for u in [
            "https://api.openai.com/v1",
            "https://my-res.openai.azure.com/openai/deployments/x",
            "http://8.8.8.8:8080",
            "https://[2001:db8::1]:8443/v1",
            "https://generativelanguage.googleapis.com",
        ] {
            assert!(saas(&p, u).is_ok(), "{u}: {:?}", saas(&p, u));
        }
        let d = saas(&p, "https://API.OpenAI.com").unwrap();
        assert_eq!(d.host, Host::Name("api.openai.com".into()));
        assert_eq!(d.port, 443);
        assert_eq!(saas(&p, "http://x.example").unwrap().port, 80);
    }

    #[test]
    fn loopback_and_link_local_need_the_allow_list() {
        let p = Policy::default();
        for u in [
            "http://127.0.0.1:9901",
            "http://127.5.6.7",
            "http://localhost:8080",
            "http://LOCALHOST",
            "http://foo.localhost",
            "http://[::1]:9901/",
            "http://169.254.1.1",
            "http://[fe80::1]",
            "http://[febf::1]",
        ] {
            assert!(saas(&p, u).is_err(), "{u}");
            assert!(p.check_url(u, true).is_err(), "{u} (hosted)");
        }
        let p = Policy::parse("127.0.0.1, [::1], localhost:8080 169.254.0.0/16").unwrap();
        assert!(saas(&p, "http://127.0.0.1:1234/v1").is_ok());
        assert!(saas(&p, "http://[::1]:9").is_ok());
        assert!(saas(&p, "http://localhost:8080").is_ok());
        assert!(saas(&p, "http://localhost:8081").is_err());
        assert!(saas(&p, "http://127.0.0.2").is_err());
        assert!(saas(&p, "http://169.254.3.4").is_ok());
    }

    #[test]
    fn never_allowed_even_when_listed() {
        let p = Policy::parse("0.0.0.0/0 [::/0] metadata.google.internal metadata 169.254.0.0/16")
            .unwrap();
        for u in [
            "http://0.0.0.0:9901",
            "http://0.1.2.3",
            "http://[::]",
            "http://169.254.169.254/latest/meta-data",
            "http://169.254.170.2",
            "http://100.100.100.200",
            "http://[fd00:ec2::254]",
            "http://metadata.google.internal/computeMetadata/v1",
            "http://METADATA",
            "http://instance-data",
            "http://metadata.google.internal.",
            "http://2130706433",
            "http://0x7f000001",
            "http://0x7f.0.0.1",
            "http://0177.0.0.1",
            "http://127.1",
            "http://127.0.1",
            "http://127.0.0.1.",
            "http://[::ffff:127.0.0.1]",
            "http://[::ffff:7f00:1]",
            "http://[::127.0.0.1]",
            "http://[64:ff9b::a9fe:a9fe]",
            "http://[fe80::1%25eth0]",
            "http://255.255.255.255",
            "http://224.0.0.1",
            "http://[ff02::1]",
            "http://user@api.openai.com",
            "http://api.openai.com\r\nX-Injected: 1",
            "http://api.openai.com/v1\r\n",
            "http://api.openai.com/v1 x",
            "http://api.openai.com/\tv1",
            "http://api.openai.com/v1\u{7f}",
            "http://api.openai.com/é",
            "http://api.openai.com/v1?x=1",
            "http://api.openai.com:0",
            "http://api.openai.com:99999",
            "http://api.openai.com:8a",
            "ftp://api.openai.com",
            "http://",
            "http://:80",
            "http://a..b",
            "http://-a.com",
            "http://a\\b",
        ] {
            assert!(p.check_url(u, true).is_err(), "{u} should be refused");
        }
    }

    #[test]
    fn private_ranges_for_hosted_or_listed() {
        let p = Policy::default();
        for u in [
            "http://10.1.2.3:8000",
            "http://172.16.0.1",
            "http://172.31.255.255",
            "http://192.168.1.1",
            "http://100.64.0.1",
            "http://[fd12::1]",
            "http://[fc00::1]",
        ] {
            assert!(saas(&p, u).is_err(), "{u}");
            assert!(p.check_url(u, true).is_ok(), "{u}");
        }
        assert!(saas(&p, "http://172.32.0.1").is_ok());
        assert!(saas(&p, "http://100.128.0.1").is_ok());
        let p = Policy::parse("10.0.0.0/8:8000,[fd00::/8]").unwrap();
        assert!(saas(&p, "http://10.9.9.9:8000").is_ok());
        assert!(saas(&p, "http://10.9.9.9:8001").is_err());
        assert!(saas(&p, "http://[fd12::1]:1").is_ok());
    }

    #[test]
    fn host_names_and_wildcards() {
        let p = Policy::parse("*.svc.cluster.local:8000").unwrap();
        // Names are public as written (not resolved here): the allow-list matters for loopback names.
        assert!(saas(&p, "http://vllm.ns.svc.cluster.local:8000").is_ok());
        let p = Policy::parse("*.localhost").unwrap();
        assert!(saas(&p, "http://a.localhost").is_ok());
        assert!(saas(&p, "http://localhost").is_err());
    }

    #[test]
    fn allow_list_syntax() {
        assert!(Policy::parse("").unwrap().is_empty());
        assert!(Policy::parse("  ,, ").unwrap().is_empty());
        for bad in [
            "10.0.0.0/33",
            "[::1",
            "host:x",
            "host:0",
            "a b\u{1}",
            "*.10.0.0.1",
            "name/8",
            "[::1]x",
            "0x7f.1",
        ] {
            assert!(Policy::parse(bad).is_err(), "{bad}");
        }
        let p = Policy::parse("10.1.2.3/8").unwrap();
        assert!(
            saas(&p, "http://10.200.0.1").is_ok(),
            "the network is masked"
        );
        let p = Policy::parse("[::/0]:443").unwrap();
        assert!(saas(&p, "https://[::1]").is_ok());
        assert!(saas(&p, "http://[::1]").is_err());
    }
}
