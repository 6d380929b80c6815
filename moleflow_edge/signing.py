"""Ed25519 signatures for export manifests: who made an export, not only whether it is whole.

The sha256 list in a manifest catches damaged or half-copied files, but anyone who can write
the export directory can change a graph and its hash together. A signature over the manifest
(which holds every file's sha256) ties the whole export to a private key that never leaves
the build machine; the line PC keeps only public keys. A folder once signed keeps the ids of its
signers in SIGNED_MARKER, so that a signature deleted later reads as tampering. Torch-free; needs the ``cryptography``
package (``pip install moleflow-edge[sign]``) only where keys are used.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from moleflow_edge.atomic import write_atomic, write_text_atomic
from moleflow_edge.errors import UserError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "ed25519"
PUBLIC_SUFFIX = ".pub"
PRIVATE_KEY_MODE = 0o600  # whatever the umask: the one file only its owner may read
# beside a signed manifest: the ids of the keys that ever signed that folder, one a line. Never
# removed by the toolkit, so a signature field deleted later is seen as tampering
SIGNED_MARKER = "signed-by"
UNKNOWN_SIGNER = "unknown"  # what an unreadable marker says: the folder was signed, by whom is not known


class SignatureError(UserError, ValueError):
    """A key that cannot be read, or a manifest whose signature is missing or does not verify.

    Also a ValueError: Runtime.load raises it, and its callers (the camera loop, serve, doctor, the
    live-export switch) refuse an export on ValueError."""


def _crypto():  # noqa: ANN202 - the cryptography modules, imported where keys are used
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SignatureError(
            "signed exports need the cryptography package: pip install 'moleflow-edge[sign]'"
        ) from None
    return serialization, ed25519, InvalidSignature


def key_id(public: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the first 16 hex digits of the sha256 of its raw bytes."""
    serialization, _, _ = _crypto()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: str | Path) -> tuple[Path, Path]:
    """Write a new private key (PEM, mode 0600 whatever the umask) and its public key beside it (.pub).

    Refuses to overwrite an existing key: a lost private key cannot sign updates for line PCs
    that trust it.
    """
    serialization, ed25519, _ = _crypto()
    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.name + PUBLIC_SUFFIX)
    for path in (private_path, public_path):
        if path.exists():
            raise SignatureError(f"{path} already exists; choose another key file (a key is never overwritten)")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    write_atomic(private_path, lambda tmp: tmp.write_bytes(private_pem), mode=PRIVATE_KEY_MODE)
    write_atomic(public_path, lambda tmp: tmp.write_bytes(public_pem))
    return private_path, public_path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    serialization, ed25519, _ = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"cannot read the signing key {path}: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key (make one with moleflow-edge keygen)")
    return key


def load_public_keys(paths: Sequence[str | Path]) -> list[Ed25519PublicKey]:
    """Public keys (PEM) from files; a private key file also works (its public half is used)."""
    serialization, ed25519, _ = _crypto()
    keys = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise SignatureError(f"cannot read the trusted key {path}: {exc}") from exc
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError:
            try:
                key = serialization.load_pem_private_key(data, password=None).public_key()
            except (ValueError, TypeError) as exc:
                raise SignatureError(f"{path} is not a PEM public key: {exc}") from exc
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise SignatureError(f"{path} is not an Ed25519 public key (make one with moleflow-edge keygen)")
        keys.append(key)
    return keys


def checking_keys(
    signing_key: Ed25519PrivateKey | None, trusted: Sequence[Ed25519PublicKey] = ()
) -> list[Ed25519PublicKey]:
    """The keys an existing signature must verify with before a manifest is signed again: the trusted
    keys and the signing key's own public half (an export is re-signed by the key that signed it)."""
    return [*trusted, *([] if signing_key is None else [signing_key.public_key()])]


def sign(payload: bytes, key: Ed25519PrivateKey) -> dict[str, str]:
    """The signature record stored in the manifest."""
    return {
        "algorithm": ALGORITHM,
        "key_id": key_id(key.public_key()),
        "value": base64.b64encode(key.sign(payload)).decode("ascii"),
    }


def verify(payload: bytes, record: object, trusted: Sequence[Ed25519PublicKey]) -> str:
    """Check ``record`` over ``payload`` against the trusted keys; returns the key id that signed it."""
    _, _, invalid = _crypto()
    if record is None:
        raise SignatureError(
            "it is not signed, and trusted keys are configured (sign it from the model: export --all --sign KEY)"
        )
    if not isinstance(record, dict) or record.get("algorithm") != ALGORITHM or not isinstance(record.get("value"), str):
        raise SignatureError(f"its signature record is malformed (expected an {ALGORITHM} signature)")
    try:
        signature = base64.b64decode(record["value"], validate=True)
    except ValueError:
        raise SignatureError("its signature is not valid base64") from None
    for key in trusted:
        try:
            key.verify(signature, payload)
            return key_id(key)
        except invalid:
            continue
    trusted_ids = ", ".join(key_id(k) for k in trusted)
    raise SignatureError(
        f"its signature (key {record.get('key_id')!r}) does not verify with any trusted key ({trusted_ids}): "
        "the manifest was changed after signing, or it was signed by a key this machine does not trust"
    )


def signed_by(folder: str | Path) -> list[str]:
    """The ids of the keys that ever signed the export in ``folder`` ([] when none did). A marker that
    cannot be read still says the folder was signed: doubt is answered by a rebuild from the model."""
    path = Path(folder) / SIGNED_MARKER
    if not (path.exists() or path.is_symlink()):
        return []
    try:
        return path.read_text(errors="replace").split() or [UNKNOWN_SIGNER]
    except OSError:
        return [UNKNOWN_SIGNER]


def record_signer(folder: str | Path, key: Ed25519PrivateKey) -> None:
    """Add ``key``'s id to ``folder``'s SIGNED_MARKER (called once a manifest it signed is written)."""
    known, signer = signed_by(folder), key_id(key.public_key())
    if signer not in known:
        ids = [k for k in known if k != UNKNOWN_SIGNER] + [signer]
        write_text_atomic(Path(folder) / SIGNED_MARKER, "".join(f"{k}\n" for k in ids))


def sign_from_model(folder: str | Path) -> str:
    """The one way to sign an export that is not known good: every graph rebuilt from the model."""
    return f"sign it from the model: moleflow-edge export --model MODEL --all --out {folder} --sign KEY"
