//! Detached ed25519 signatures over a component's sha256, so an operator
//! can trust a publisher's key instead of re-checking every digest.
//!
//! Files are small self-describing text:
//! - private key (mode 0600): `cordon-private-key-v1 <base64 seed>`
//! - public key: `cordon-public-key-v1 <base64 key>`
//! - signature `FILE.wasm.sig`: `cordon-signature-v1`, then `key:`,
//!   `sha256:` and `signature:` lines; the signature is over the 32 raw
//!   bytes of the file's sha256.
//!
//! A signature is checked before the component is compiled: it must name
//! the file's digest, verify, and come from a key in the agent config's
//! `trusted-keys`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

const PRIVATE: &str = "cordon-private-key-v1";
const PUBLIC: &str = "cordon-public-key-v1";
const SIGNATURE: &str = "cordon-signature-v1";

/// The signature file of a component: `FILE.sig`.
pub fn signature_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".sig");
    PathBuf::from(name)
}

fn decode<const N: usize>(text: &str, what: &str) -> Result<[u8; N]> {
    let bytes = B64.decode(text.trim()).with_context(|| format!("{what} is not base64"))?;
    bytes.try_into().map_err(|b: Vec<u8>| anyhow::anyhow!("{what} has {} bytes, expected {N}", b.len()))
}

/// A public key as written in a `.pub` file or in `trusted-keys`
/// (with or without the `cordon-public-key-v1` prefix).
pub fn parse_public(text: &str) -> Result<VerifyingKey> {
    let text = text.trim();
    if text.starts_with(PRIVATE) {
        bail!("this is a private key; give its public key (the `.pub` file written next to it), and keep the private one secret");
    }
    let b64 = text.strip_prefix(PUBLIC).unwrap_or(text);
    VerifyingKey::from_bytes(&decode::<32>(b64, "the public key")?).context("not a valid ed25519 public key")
}

pub fn public_text(key: &VerifyingKey) -> String {
    format!("{PUBLIC} {}", B64.encode(key.as_bytes()))
}

/// Writes a new key pair: `path` (private, 0600) and `path.pub`.
pub fn keygen(path: &Path) -> Result<(PathBuf, VerifyingKey)> {
    let public_path = PathBuf::from(format!("{}.pub", path.display()));
    for p in [path, public_path.as_path()] {
        if p.exists() {
            bail!("{} already exists; refusing to overwrite a key", p.display());
        }
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no system randomness: {e}"))?;
    let key = SigningKey::from_bytes(&seed);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).with_context(|| format!("cannot create {}", path.display()))?;
    std::io::Write::write_all(&mut file, format!("{PRIVATE} {}\n", B64.encode(seed)).as_bytes())?;
    std::fs::write(&public_path, format!("{}\n", public_text(&key.verifying_key())))?;
    Ok((public_path, key.verifying_key()))
}

fn read_private(path: &Path) -> Result<SigningKey> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the key {}", path.display()))?;
    let b64 = text.trim().strip_prefix(PRIVATE).with_context(|| format!("{} is not a cordon private key", path.display()))?;
    Ok(SigningKey::from_bytes(&decode::<32>(b64, "the private key")?))
}

fn digest(file: &Path) -> Result<[u8; 32]> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    Ok(Sha256::digest(&bytes).into())
}

/// Signs `file` with the private key at `key`, writing `file.sig`.
pub fn sign(file: &Path, key: &Path) -> Result<PathBuf> {
    let key = read_private(key)?;
    let sha = digest(file)?;
    let signature = key.sign(&sha);
    let path = signature_path(file);
    let text = format!(
        "{SIGNATURE}\nkey: {}\nsha256: {}\nsignature: {}\n",
        B64.encode(key.verifying_key().as_bytes()),
        hex::encode(sha),
        B64.encode(signature.to_bytes())
    );
    crate::files::write_atomic(&path, text.as_bytes())?;
    Ok(path)
}

/// Signs `bytes` with the private key at `key` (a registry signature's
/// payload); returns the signature and the key's public half.
pub fn sign_bytes(bytes: &[u8], key: &Path) -> Result<(Signature, VerifyingKey)> {
    let key = read_private(key)?;
    Ok((key.sign(bytes), key.verifying_key()))
}

/// A parsed signature file.
struct Detached {
    key: VerifyingKey,
    sha256: [u8; 32],
    signature: Signature,
}

fn parse(text: &str) -> Result<Detached> {
    let mut lines = text.lines();
    if lines.next().map(str::trim) != Some(SIGNATURE) {
        bail!("it is not a {SIGNATURE} file");
    }
    let mut fields = BTreeMap::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            fields.insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    let field = |name: &str| fields.get(name).with_context(|| format!("it has no `{name}:` line"));
    let key = parse_public(field("key")?)?;
    let sha256: [u8; 32] = hex::decode(field("sha256")?).ok().and_then(|b| b.try_into().ok()).context("its sha256 is not 64 hex digits")?;
    let signature = Signature::from_bytes(&decode::<64>(field("signature")?, "the signature")?);
    Ok(Detached { key, sha256, signature })
}

/// Checks the signature of the component whose sha256 is `sha` (hex)
/// against `trusted` keys; returns the name of the key that signed it.
pub fn check(file: &Path, sig: &Path, sha: &str, trusted: &BTreeMap<String, VerifyingKey>) -> Result<String> {
    let shown = sig.display();
    let text = std::fs::read_to_string(sig).with_context(|| {
        format!("{shown} cannot be read: the component must be signed (`cordon plugin sign {} --key KEY`)", file.display())
    })?;
    let d = parse(&text).with_context(|| format!("{shown} is not a valid signature file"))?;
    if hex::encode(d.sha256) != sha {
        bail!("{shown} signs sha256 {}, but {} has sha256 {sha}: the signature belongs to another build", hex::encode(d.sha256), file.display());
    }
    let name = trusted
        .iter()
        .find(|(_, k)| **k == d.key)
        .map(|(n, _)| n.clone())
        .with_context(|| format!("{shown} is signed by key {}, which is not in `trusted-keys`", B64.encode(d.key.as_bytes())))?;
    d.key
        .verify_strict(&d.sha256, &d.signature)
        .map_err(|_| anyhow::anyhow!("{shown} does not verify with key `{name}`: the signature is invalid"))?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_then_check_and_every_way_it_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (file, other) = (dir.path().join("p.wasm"), dir.path().join("q.wasm"));
        std::fs::write(&file, b"component bytes").unwrap();
        std::fs::write(&other, b"other bytes").unwrap();
        let (_, public) = keygen(&dir.path().join("key")).unwrap();
        let (_, stranger) = keygen(&dir.path().join("stranger")).unwrap();
        assert!(keygen(&dir.path().join("key")).is_err(), "a key is never overwritten");
        let sig = sign(&file, &dir.path().join("key")).unwrap();
        let trusted = BTreeMap::from([("release".to_string(), public)]);
        let sha = hex::encode(digest(&file).unwrap());
        assert_eq!(check(&file, &sig, &sha, &trusted).unwrap(), "release");

        let other_sha = hex::encode(digest(&other).unwrap());
        assert!(check(&other, &sig, &other_sha, &trusted).unwrap_err().to_string().contains("belongs to another build"));
        let untrusted = BTreeMap::from([("other".to_string(), stranger)]);
        assert!(check(&file, &sig, &sha, &untrusted).unwrap_err().to_string().contains("not in `trusted-keys`"));
        let text = std::fs::read_to_string(&sig).unwrap();
        let forged = text.lines().map(|l| if l.starts_with("signature:") { format!("signature: {}", B64.encode([7u8; 64])) } else { l.to_string() }).collect::<Vec<_>>().join("\n");
        std::fs::write(&sig, forged).unwrap();
        assert!(check(&file, &sig, &sha, &trusted).unwrap_err().to_string().contains("signature is invalid"));
        let missing = dir.path().join("none.sig");
        assert!(check(&file, &missing, &sha, &trusted).unwrap_err().to_string().contains("must be signed"));
        // A private key given where a public one belongs: named, not echoed.
        let private = std::fs::read_to_string(dir.path().join("key")).unwrap();
        let err = parse_public(&private).unwrap_err().to_string();
        assert!(err.contains("this is a private key") && !err.contains(private.split(' ').nth(1).unwrap().trim()), "{err}");
    }
}
