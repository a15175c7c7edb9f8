//! Chunk ids and encryption. An unencrypted repository names chunks by their BLAKE3 hash; an
//! encrypted one by a keyed BLAKE3 hash (so ids say nothing about content to whoever lacks the
//! key) and seals every object with XChaCha20-Poly1305. The keys come from a random master key
//! stored in the repository's config, wrapped by a key derived from the passphrase (Argon2id).

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

/// A chunk's or object's content address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Stands for a chunk of zeros, which is never stored.
    pub const ZERO: ChunkId = ChunkId([0; 32]);

    pub fn to_hex(self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(text: &str) -> Option<ChunkId> {
        if text.len() != 64 {
            return None;
        }
        let mut id = [0u8; 32];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(ChunkId(id))
    }
}

impl std::fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// What sealing adds to an object's length.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("wrong passphrase")]
    WrongPassphrase,
    #[error("an object failed authentication: it was altered or damaged")]
    Tampered,
    #[error("key derivation: {0}")]
    Kdf(String),
}

/// Argon2id parameters, stored in the config so a repository opens with the ones it was made
/// with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    pub salt: String,
}

impl KdfParams {
    /// The defaults: 64 MiB and 3 passes, about a third of a second on one core.
    pub fn standard() -> Self {
        Self { memory_kib: 64 * 1024, iterations: 3, parallelism: 1, salt: hex(&random::<16>()) }
    }

    /// Cheap parameters for tests, where the KDF's cost is not what is tested.
    pub fn cheap() -> Self {
        Self { memory_kib: 64, iterations: 1, parallelism: 1, salt: hex(&random::<16>()) }
    }

    fn derive(&self, passphrase: &str) -> Result<[u8; 32], CryptoError> {
        let params = argon2::Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32))
            .map_err(|e| CryptoError::Kdf(e.to_string()))?;
        let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut key = [0u8; 32];
        argon
            .hash_password_into(passphrase.as_bytes(), self.salt.as_bytes(), &mut key)
            .map_err(|e| CryptoError::Kdf(e.to_string()))?;
        Ok(key)
    }
}

pub fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // Without randomness there are no safe nonces or keys; nothing to fall back to.
    getrandom::getrandom(&mut bytes).expect("the operating system's random source");
    bytes
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(text: &str) -> Option<Vec<u8>> {
    (0..text.len()).step_by(2).map(|i| text.get(i..i + 2).and_then(|pair| u8::from_str_radix(pair, 16).ok())).collect()
}

fn seal_with(cipher: &XChaCha20Poly1305, plain: &[u8]) -> Vec<u8> {
    let nonce = random::<NONCE_LEN>();
    let sealed = cipher.encrypt(XNonce::from_slice(&nonce), plain).expect("encryption of an in-memory buffer");
    let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

fn open_with(cipher: &XChaCha20Poly1305, sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < SEAL_OVERHEAD {
        return None;
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    cipher.decrypt(XNonce::from_slice(nonce), body).ok()
}

/// The repository's keys, or none for an unencrypted repository.
#[derive(Clone)]
pub struct Keys {
    id_key: Option<[u8; 32]>,
    cipher: Option<XChaCha20Poly1305>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys {{ encrypted: {} }}", self.cipher.is_some())
    }
}

impl Keys {
    pub fn plain() -> Keys {
        Keys { id_key: None, cipher: None }
    }

    pub fn encrypted(&self) -> bool {
        self.cipher.is_some()
    }

    /// New random keys; returns them and the master key wrapped by `passphrase`.
    pub fn generate(passphrase: &str, kdf: &KdfParams) -> Result<(Keys, String), CryptoError> {
        let master = random::<64>();
        let kek = XChaCha20Poly1305::new(&kdf.derive(passphrase)?.into());
        Ok((Self::from_master(&master), hex(&seal_with(&kek, &master))))
    }

    /// The keys wrapped in `wrapped` by `passphrase`.
    pub fn unwrap(passphrase: &str, kdf: &KdfParams, wrapped: &str) -> Result<Keys, CryptoError> {
        let kek = XChaCha20Poly1305::new(&kdf.derive(passphrase)?.into());
        let sealed = unhex(wrapped).ok_or(CryptoError::WrongPassphrase)?;
        let master = open_with(&kek, &sealed).ok_or(CryptoError::WrongPassphrase)?;
        let master: [u8; 64] = master.try_into().map_err(|_| CryptoError::WrongPassphrase)?;
        Ok(Self::from_master(&master))
    }

    fn from_master(master: &[u8; 64]) -> Keys {
        let (encryption, id) = master.split_at(32);
        Keys {
            id_key: Some(id.try_into().expect("32 bytes")),
            cipher: Some(XChaCha20Poly1305::new_from_slice(encryption).expect("a 32-byte key")),
        }
    }

    /// The content address of `data`.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        ChunkId(match &self.id_key {
            Some(key) => *blake3::keyed_hash(key, data).as_bytes(),
            None => *blake3::hash(data).as_bytes(),
        })
    }

    pub fn seal(&self, plain: Vec<u8>) -> Vec<u8> {
        match &self.cipher {
            Some(cipher) => seal_with(cipher, &plain),
            None => plain,
        }
    }

    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        match &self.cipher {
            Some(cipher) => open_with(cipher, sealed).ok_or(CryptoError::Tampered),
            None => Ok(sealed.to_vec()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrapped_key_opens_with_its_passphrase_only() {
        let kdf = KdfParams::cheap();
        let (keys, wrapped) = Keys::generate("right", &kdf).unwrap();
        let again = Keys::unwrap("right", &kdf, &wrapped).unwrap();
        assert_eq!(keys.chunk_id(b"x"), again.chunk_id(b"x"));
        assert!(matches!(Keys::unwrap("wrong", &kdf, &wrapped), Err(CryptoError::WrongPassphrase)));
    }

    #[test]
    fn sealed_objects_open_and_tampering_is_caught() {
        let (keys, _) = Keys::generate("p", &KdfParams::cheap()).unwrap();
        let sealed = keys.seal(b"hello".to_vec());
        assert_eq!(sealed.len(), 5 + SEAL_OVERHEAD);
        assert_eq!(keys.open(&sealed).unwrap(), b"hello");
        let mut bad = sealed.clone();
        bad[30] ^= 1;
        assert!(matches!(keys.open(&bad), Err(CryptoError::Tampered)));
        assert_ne!(keys.chunk_id(b"x"), Keys::plain().chunk_id(b"x"), "encrypted ids are keyed");
    }

    #[test]
    fn hex_round_trips() {
        let id = Keys::plain().chunk_id(b"abc");
        assert_eq!(ChunkId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(ChunkId::from_hex("zz"), None);
    }
}
