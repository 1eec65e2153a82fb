//! The key vault: provider API keys are sealed with AES-256-GCM before they reach the database.
//!
//! The master key comes from `LLM_GATEWAY_VAULT_KEY` (base64 of 32 bytes) or from `vault.key` in the
//! data dir, created with mode 0600 on first start. Each sealed value is bound (as associated data) to
//! the row it belongs to, so a ciphertext copied to another row does not open.

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use std::path::Path;

const PREFIX: &str = "v1:";
const NONCE_LEN: usize = 12;

pub struct Vault {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Vault(..)")
    }
}

impl Vault {
    pub fn from_key_bytes(bytes: &[u8]) -> Result<Vault, String> {
        if bytes.len() != 32 {
            return Err(format!(
                "the vault key must be 32 bytes, got {}",
                bytes.len()
            ));
        }
        let key = Key::<Aes256Gcm>::from_slice(bytes);
        Ok(Vault {
            cipher: Aes256Gcm::new(key),
        })
    }

    /// Loads the master key from the environment or the data dir (creating it on first start).
    pub fn load(data_dir: &Path) -> Result<Vault, String> {
        if let Some(v) = std::env::var("LLM_GATEWAY_VAULT_KEY")
            .ok()
            .filter(|v| !v.trim().is_empty())
        {
            let bytes = B64
                .decode(v.trim())
                .map_err(|e| format!("LLM_GATEWAY_VAULT_KEY is not valid base64: {e}"))?;
            return Vault::from_key_bytes(&bytes)
                .map_err(|e| format!("LLM_GATEWAY_VAULT_KEY: {e}"));
        }
        let path = data_dir.join("vault.key");
        let text = crate::util::read_or_create_secret(&path, || {
            let mut k = [0u8; 32];
            OsRng.fill_bytes(&mut k);
            B64.encode(k)
        })?;
        let bytes = B64
            .decode(text.trim())
            .map_err(|e| format!("{} is not valid base64: {e}", path.display()))?;
        Vault::from_key_bytes(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn seal(&self, plaintext: &str, aad: &str) -> Result<String, String> {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let ct = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| "vault: encryption failed".to_string())?;
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(format!("{PREFIX}{}", B64.encode(out)))
    }

    pub fn open(&self, sealed: &str, aad: &str) -> Result<String, String> {
        let body = sealed
            .strip_prefix(PREFIX)
            .ok_or("vault: unknown ciphertext format")?;
        let raw = B64
            .decode(body)
            .map_err(|_| "vault: ciphertext is not base64".to_string())?;
        if raw.len() < NONCE_LEN {
            return Err("vault: ciphertext too short".to_string());
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        let pt = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| {
                "vault: cannot decrypt a stored key (wrong LLM_GATEWAY_VAULT_KEY / vault.key, \
                 or the replicas do not share one vault key)"
                    .to_string()
            })?;
        String::from_utf8(pt).map_err(|_| "vault: decrypted key is not UTF-8".to_string())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_roundtrip_and_aad_binding() {
        let v = Vault::from_key_bytes(&[7u8; 32]).unwrap();
        let s = v.seal("sk-secret-1234", "provider:o:p").unwrap();
        assert!(!s.contains("sk-secret"));
        assert_eq!(v.open(&s, "provider:o:p").unwrap(), "sk-secret-1234");
        assert!(v.open(&s, "provider:o:other").is_err());
        let other = Vault::from_key_bytes(&[8u8; 32]).unwrap();
        assert!(other.open(&s, "provider:o:p").is_err());
        assert_ne!(v.seal("x", "a").unwrap(), v.seal("x", "a").unwrap());
        assert!(Vault::from_key_bytes(&[1u8; 16]).is_err());
    }
}
