"""Ed25519 client keys: generate, fingerprint, save (PEM, mode 0600, atomically) and load.

A client's identity is its Ed25519 key pair. The private key stays with the client (a PEM file, PKCS8, encrypted
only when a passphrase is given); the public key goes into the store's registry
(:mod:`gradshard.security.registry`), where it is named by its fingerprint: the sha256 hex of the raw 32-byte
public key. Everything read here is size-bounded before parsing (:data:`MAX_KEY_FILE_BYTES`), and every failure is
a :class:`~gradshard.errors.SecurityError` naming the file and the fix.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gradshard.errors import SecurityError

PrivateKey = Ed25519PrivateKey
PublicKey = Ed25519PublicKey
MAX_KEY_FILE_BYTES = 64 * 1024
PUBLIC_KEY_BYTES = 32
FINGERPRINT_HEX = 64
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


def generate() -> PrivateKey:
    """A new Ed25519 private key (from the operating system's randomness)."""
    return Ed25519PrivateKey.generate()


def public_bytes(key: PublicKey | PrivateKey) -> bytes:
    """The raw 32 bytes of a public key (of a private key: of its public half)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_b64(key: PublicKey | PrivateKey) -> str:
    """The raw public key as standard base64 (44 characters): how the registry stores it."""
    return base64.b64encode(public_bytes(key)).decode()


def fingerprint(key: PublicKey | PrivateKey | bytes) -> str:
    """The sha256 hex (64 digits) of the raw 32-byte public key: the key's name in the registry and in updates."""
    raw = key if isinstance(key, bytes) else public_bytes(key)
    if len(raw) != PUBLIC_KEY_BYTES:
        raise SecurityError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(raw)}")
    return hashlib.sha256(raw).hexdigest()


def is_fingerprint(text: str) -> bool:
    """Whether ``text`` has the form of a fingerprint (64 lowercase hex digits)."""
    return bool(_FINGERPRINT.match(text))


def check_fingerprint(text: str) -> str:
    if not is_fingerprint(text):
        raise SecurityError(f"{text[:80]!r} is not a key fingerprint (64 lowercase hex digits; 'gradshard keys "
                            "new' prints it)")
    return text


def private_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    """The private key as PKCS8 PEM; encrypted (the library's best available scheme) when ``passphrase`` is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def public_pem(key: PublicKey | PrivateKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def save_private_key(key: PrivateKey, path: str | Path, passphrase: bytes | None = None, *,
                     overwrite: bool = False) -> Path:
    """Write the private key as PEM to ``path`` atomically, readable by its owner only (mode 0600).

    The bytes go to a temporary file created 0600 in the same directory, are flushed to disk and renamed over
    ``path``: a crash leaves the old file or the new one, and the key is never readable by others, not even
    briefly. An existing file is refused unless ``overwrite`` (losing a private key loses the identity)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise SecurityError(f"{path} exists; refusing to overwrite a key file (remove it first, or choose "
                            "another path)")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(private_pem(key, passphrase))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)  # O_CREAT's mode is masked by the umask; 0600 is never widened by it, but be exact
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _read_bounded(path: Path, what: str) -> bytes:
    """The bytes of a key file, refused before reading when it is not a regular file or over the size bound."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise SecurityError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not path.is_file():
        raise SecurityError(f"{what} {path} is not a regular file")
    if size > MAX_KEY_FILE_BYTES:
        raise SecurityError(f"{what} {path} is {size:,} bytes, over the {MAX_KEY_FILE_BYTES:,} a key file may "
                            "have: it is not a key file")
    with path.open("rb") as f:
        data = f.read(MAX_KEY_FILE_BYTES + 1)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise SecurityError(f"{what} {path} grew over {MAX_KEY_FILE_BYTES:,} bytes while it was read")
    return data


def parse_private_key(data: bytes, passphrase: bytes | None = None, source: str = "the key") -> PrivateKey:
    """A PEM (PKCS8) Ed25519 private key; :class:`SecurityError` for anything else."""
    if len(data) > MAX_KEY_FILE_BYTES:
        raise SecurityError(f"{source} is {len(data):,} bytes, over the {MAX_KEY_FILE_BYTES:,} a key may have")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:  # encrypted without a passphrase, or a passphrase for an unencrypted key
        raise SecurityError(f"{source}: {exc}") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        hint = " (wrong passphrase?)" if passphrase else ""
        raise SecurityError(f"{source} is not a PEM private key{hint}: {str(exc)[:200]}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SecurityError(f"{source} is a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_private_key(path: str | Path, passphrase: bytes | None = None) -> PrivateKey:
    """Read a private key PEM file (at most :data:`MAX_KEY_FILE_BYTES`)."""
    path = Path(path)
    return parse_private_key(_read_bounded(path, "private key file"), passphrase, f"private key file {path}")


def parse_public_key(data: bytes | str, source: str = "the public key") -> PublicKey:
    """A public key from PEM (SubjectPublicKeyInfo) or from the base64 of its raw 32 bytes."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise SecurityError(f"{source} is {len(raw):,} bytes, over the {MAX_KEY_FILE_BYTES:,} a key may have")
    text = raw.strip()
    if text.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise SecurityError(f"{source} is not a PEM public key: {str(exc)[:200]}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SecurityError(f"{source} is a {type(key).__name__}, not an Ed25519 public key")
        return key
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SecurityError(f"{source} is neither a PEM public key nor the base64 of a raw 32-byte Ed25519 "
                            "key") from None
    if len(decoded) != PUBLIC_KEY_BYTES:
        raise SecurityError(f"{source} decodes to {len(decoded)} bytes; a raw Ed25519 public key is "
                            f"{PUBLIC_KEY_BYTES}")
    return Ed25519PublicKey.from_public_bytes(decoded)


def load_public_key(source: str | Path) -> PublicKey:
    """A public key from a file (PEM or base64) when ``source`` names one, else ``source`` itself as base64."""
    path = Path(source)
    if isinstance(source, Path) or (len(str(source)) < 4096 and path.exists()):
        return parse_public_key(_read_bounded(path, "public key file"), f"public key file {path}")
    return parse_public_key(str(source), "the public key given")
