//! Ed25519 keys for signed checkpoints, in the signed-note key format
//! (c2sp.org/signed-note): one line each.
//!
//! ```text
//! private (0600):  PRIVATE+KEY+<name>+<key id, 8 hex digits>+<base64(0x01 || 32-byte seed)>
//! public:          <name>+<key id, 8 hex digits>+<base64(0x01 || 32-byte public key)>
//! ```
//!
//! The key id is the first four bytes of SHA-256(name || "\n" || 0x01 || public
//! key), big-endian: a signature line names its key by name and id, so a note
//! signed by another key (or by a key of the same name) is told apart before any
//! signature is checked. The writer holds the private key; an auditor holds the
//! public one.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use rand::RngCore as _;
use sha2::{Digest, Sha256};

/// The algorithm byte of an Ed25519 key in the signed-note format.
const ALG_ED25519: u8 = 0x01;
const PRIVATE_PREFIX: &str = "PRIVATE+KEY+";

/// File names `auditwal keygen` writes.
pub const PRIVATE_KEY_FILE: &str = "auditwal.key";
pub const PUBLIC_KEY_FILE: &str = "auditwal.pub";

/// What is wrong with a key or its file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("{path} is readable by group or others (mode {mode:o}); `chmod 600 {path}`")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("invalid key name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
}

/// Signs checkpoints: the writer's key.
pub struct Signer {
    name: String,
    id: u32,
    key: SigningKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        write!(f, "Signer({}+{:08x})", self.name, self.id)
    }
}

/// Checks checkpoint signatures: the auditor's key.
#[derive(Debug, Clone)]
pub struct Verifier {
    name: String,
    id: u32,
    key: VerifyingKey,
}

fn key_id(name: &str, public: &VerifyingKey) -> u32 {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([ALG_ED25519]);
    h.update(public.as_bytes());
    let d = h.finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

fn check_name(name: &str) -> Result<(), KeyError> {
    let bad = |reason| {
        Err(KeyError::BadName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 64 {
        return bad("longer than 64 bytes");
    }
    if name
        .chars()
        .any(|c| c == '+' || c.is_whitespace() || c.is_control())
    {
        return bad("contains '+', a space or a control character");
    }
    Ok(())
}

impl Signer {
    /// A fresh key from the operating system's random source.
    pub fn generate(name: &str) -> Signer {
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        Signer::from_seed(name, seed)
    }

    fn from_seed(name: &str, seed: [u8; 32]) -> Signer {
        let key = SigningKey::from_bytes(&seed);
        Signer {
            name: name.to_string(),
            id: key_id(name, &key.verifying_key()),
            key,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }

    pub fn verifier(&self) -> Verifier {
        Verifier {
            name: self.name.clone(),
            id: self.id,
            key: self.key.verifying_key(),
        }
    }

    /// The private key line.
    pub fn to_text(&self) -> String {
        let mut blob = vec![ALG_ED25519];
        blob.extend_from_slice(self.key.as_bytes());
        format!(
            "{PRIVATE_PREFIX}{}+{:08x}+{}",
            self.name,
            self.id,
            B64.encode(blob)
        )
    }

    /// Reads a private key file, refusing one that group or others can read.
    pub fn read(path: &Path) -> Result<Signer, KeyError> {
        use std::os::unix::fs::PermissionsExt as _;
        let meta = std::fs::metadata(path).map_err(|e| KeyError::Io {
            action: "read the signing key",
            path: path.to_path_buf(),
            source: e,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::TooOpen {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = read_text(path, "read the signing key")?;
        let malformed = |reason: &str| KeyError::Malformed {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let rest = text
            .strip_prefix(PRIVATE_PREFIX)
            .ok_or_else(|| malformed("not a private key (PRIVATE+KEY+<name>+<id>+<key>)"))?;
        let (name, id, bytes) = split_key(rest).map_err(|r| malformed(&r))?;
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|_| malformed("the key is not 32 bytes"))?;
        let signer = Signer::from_seed(name, seed);
        if signer.id != id {
            return Err(malformed("the key id does not match the key"));
        }
        Ok(signer)
    }
}

impl Verifier {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        self.key
            .verify_strict(message, &Signature::from_bytes(signature))
            .is_ok()
    }

    /// The public key line.
    pub fn to_text(&self) -> String {
        let mut blob = vec![ALG_ED25519];
        blob.extend_from_slice(self.key.as_bytes());
        format!("{}+{:08x}+{}", self.name, self.id, B64.encode(blob))
    }

    /// Reads a public key file (`auditwal keygen`'s `auditwal.pub`).
    pub fn read(path: &Path) -> Result<Verifier, KeyError> {
        let text = read_text(path, "read the public key")?;
        let malformed = |reason: &str| KeyError::Malformed {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if text.starts_with(PRIVATE_PREFIX) {
            return Err(malformed(
                "this is the private key; pass the public one (auditwal.pub)",
            ));
        }
        let (name, id, bytes) = split_key(&text).map_err(|r| malformed(&r))?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| malformed("the key is not 32 bytes"))?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| malformed("not a valid Ed25519 public key"))?;
        if key_id(name, &key) != id {
            return Err(malformed("the key id does not match the key"));
        }
        Ok(Verifier {
            name: name.to_string(),
            id,
            key,
        })
    }
}

fn read_text(path: &Path, action: &'static str) -> Result<String, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|e| KeyError::Io {
        action,
        path: path.to_path_buf(),
        source: e,
    })?;
    Ok(text.trim().to_string())
}

/// `<name>+<id hex>+<base64(alg || key)>` into its parts.
fn split_key(text: &str) -> Result<(&str, u32, Vec<u8>), String> {
    // splitn: standard base64 has '+' in its alphabet.
    let mut parts = text.splitn(3, '+');
    let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("expected <name>+<key id>+<base64 key>".into());
    };
    check_name(name).map_err(|e| e.to_string())?;
    let id = (id.len() == 8)
        .then(|| u32::from_str_radix(id, 16).ok())
        .flatten()
        .ok_or("the key id is not 8 hex digits")?;
    let blob = B64.decode(key).map_err(|_| "the key is not base64")?;
    match blob.split_first() {
        Some((&ALG_ED25519, key)) => Ok((name, id, key.to_vec())),
        _ => Err("not an Ed25519 key (algorithm byte 0x01)".into()),
    }
}

/// Writes a new key pair into `dir` (created if needed): the private key with
/// mode 0600, never over an existing file. Returns both paths.
pub fn write_pair(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), KeyError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    check_name(name)?;
    std::fs::create_dir_all(dir).map_err(|e| KeyError::Io {
        action: "create",
        path: dir.to_path_buf(),
        source: e,
    })?;
    let signer = Signer::generate(name);
    let private = dir.join(PRIVATE_KEY_FILE);
    let public = dir.join(PUBLIC_KEY_FILE);
    let write = |path: &Path, mode: u32, text: String| -> Result<(), KeyError> {
        let io = |e| KeyError::Io {
            action: "write",
            path: path.to_path_buf(),
            source: e,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(io)?;
        f.write_all(format!("{text}\n").as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)
    };
    write(&private, 0o600, signer.to_text())?;
    write(&public, 0o644, signer.verifier().to_text())?;
    Ok((private, public))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_round_trips_through_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let (private, public) = write_pair(dir.path(), "edge-keys").unwrap();
        let signer = Signer::read(&private).unwrap();
        let verifier = Verifier::read(&public).unwrap();
        assert_eq!(signer.name(), "edge-keys");
        assert_eq!(signer.id(), verifier.id());
        let sig = signer.sign(b"hello");
        assert!(verifier.verify(b"hello", &sig));
        assert!(!verifier.verify(b"hellO", &sig));
        // Never over an existing pair.
        assert!(matches!(
            write_pair(dir.path(), "edge-keys"),
            Err(KeyError::Io { .. })
        ));
    }

    #[test]
    fn a_readable_private_key_and_a_swapped_file_are_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let (private, _) = write_pair(dir.path(), "k").unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Signer::read(&private),
            Err(KeyError::TooOpen { mode: 0o644, .. })
        ));
        assert!(matches!(
            Verifier::read(&private),
            Err(KeyError::Malformed { .. })
        ));
    }

    #[test]
    fn bad_names_are_refused() {
        for name in ["", "a+b", "a b"] {
            assert!(check_name(name).is_err(), "{name:?}");
        }
    }
}
