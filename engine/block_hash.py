"""Content hashes of full KV blocks, for prefix caching.

Block i's hash covers its parent's hash (block i - 1's), its token ids and the request's cache_salt, so equal hashes
mean equal whole prefixes, and a salt keeps one tenant's blocks out of another's reach. The hash is BLAKE2b keyed
with a random secret made once per process: a client that cannot learn the key cannot craft colliding prompts, nor
probe whether some other prompt is cached by predicting hashes. The pool still confirms every hit against the key
tuple the hash was computed from (BlockPool.lookup), so even a collision cannot serve the wrong KV.
"""

from __future__ import annotations

import hashlib
import secrets
from array import array

_SECRET = secrets.token_bytes(32)
DIGEST_BYTES = 16
ROOT = b""  # the "parent hash" of a sequence's first block


def hash_block(parent: bytes, token_ids: list[int] | tuple[int, ...], salt: str | None) -> bytes:
    h = hashlib.blake2b(key=_SECRET, digest_size=DIGEST_BYTES)
    h.update(parent)
    salt_bytes = b"" if salt is None else salt.encode("utf-8", "surrogatepass")
    # Length-prefixed, so no (salt, tokens) pair can read as another.
    h.update(len(salt_bytes).to_bytes(8, "little") + salt_bytes)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def block_key(parent: bytes, token_ids: list[int] | tuple[int, ...], salt: str | None) -> tuple:
    """What a hash is confirmed against on a hit."""
    return parent, tuple(token_ids), salt
