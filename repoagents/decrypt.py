"""The ``decrypt`` repository agent and the ``shmserve encrypt-model`` tool.

A model directory can ship its files encrypted (``1/model.py.enc``, ``1/weights.bin.enc``,
optionally ``config.pbtxt.enc``). Its plaintext config.pbtxt names the agent::

    model_repository_agents {
      agents [
        { name: "decrypt", parameters [ { key: "key_file", value: "/etc/shmserve/model.key" } ] }
      ]
    }

(or ``key: "key_env", value: "MODEL_KEY"`` to take the key from an environment variable of
the server). On LOAD the agent acquires a private temporary location (mode 0700), decrypts
every ``*.enc`` file into it under its original relative path without the ``.enc``, copies
the other files (a ``X.enc`` replaces a plaintext ``X`` next to it, so ``config.pbtxt.enc``
replaces the stub config.pbtxt) and points the load at it. The runner removes the location
after UNLOAD_COMPLETE, after LOAD_FAIL, or when the load fails. Plaintext is written only
there, never into the model repository.

Cipher: AES-256-GCM from the ``cryptography`` package, in a chunked "STREAM" construction,
because model files are large: Fernet (AES-128-CBC + HMAC) authenticates a whole token
that must sit in memory at once and inflates it by a third with base64, while chunked GCM
streams a file of any size in bounded memory (1 MiB chunks), authenticates every chunk
before a byte of it is written, and keeps the ciphertext the size of the plaintext plus
16 bytes per chunk. File format (``.enc``)::

    header  = b"SHMSENC1" | key id (8) | chunk size (u32, big-endian) | salt (16)
    chunk i = AES-256-GCM(file key, nonce = i as 11 bytes big-endian | last-chunk flag,
                          plaintext chunk, aad = header | 0x00 | file name without ".enc")

The file key is HKDF-SHA256(master key, salt) — a fresh key per file, so nonces never repeat
across files. The last-chunk flag makes truncation and appended chunks fail; the chunk
index makes reordering fail; the file name in the AAD makes swapping two encrypted files
fail (only the name: renaming a version folder still works). The key id (a hash of the key)
lets a wrong key be told apart from a tampered file.

Keys are 32 random bytes, stored as URL-safe base64 text (``--generate-key``); a key file
or variable may also hold 64 hex digits (or a key file 32 raw bytes).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import logging
import os
import shutil
import stat
import struct
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .base import Action, AgentContext, AgentError, RepoAgent

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ENCRYPTED_SUFFIX",
    "KEY_SIZE",
    "DecryptAgent",
    "EncryptResult",
    "decrypt_file",
    "decrypt_tree",
    "encrypt_file",
    "encrypt_model",
    "generate_key",
    "key_id",
    "load_key",
    "main",
    "parse_key",
    "write_key_file",
]

logger = logging.getLogger("shmserve.repoagents.decrypt")

KEY_SIZE = 32
ENCRYPTED_SUFFIX = ".enc"
CONFIG_FILE = "config.pbtxt"
DEFAULT_CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 64 << 20
_TAG_SIZE = 16
_MAGIC = b"SHMSENC1"
_HEADER = struct.Struct(">8s8sI16s")
_FILE_KEY_INFO = b"shmserve decrypt agent v1 file key"
_KEY_ID_PREFIX = b"shmserve decrypt agent v1 key id\x00"


# ------------------------------------------------------------------------------------------
# Keys


def generate_key() -> bytes:
    """32 fresh random bytes."""
    return os.urandom(KEY_SIZE)


def encode_key(key: bytes) -> str:
    """The text form written to key files: URL-safe base64 (44 characters)."""
    return base64.urlsafe_b64encode(key).decode("ascii")


def key_id(key: bytes) -> bytes:
    """8 bytes identifying a key (a domain-separated SHA-256 of it), stored in each file."""
    return hashlib.sha256(_KEY_ID_PREFIX + key).digest()[:8]


def parse_key(data: bytes | str, source: str) -> bytes:
    """Decode a key: 32 raw bytes, 64 hex digits, or base64 (standard or URL-safe)."""
    if isinstance(data, bytes) and len(data) == KEY_SIZE:
        return data
    try:
        text = data.decode("ascii") if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        text = ""
    text = text.strip()
    if len(text) == 2 * KEY_SIZE:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    if text:
        padded = text + "=" * (-len(text) % 4)
        for decode in (base64.urlsafe_b64decode, base64.standard_b64decode):
            try:
                key = decode(padded.encode("ascii"))
            except (binascii.Error, ValueError):
                continue
            if len(key) == KEY_SIZE:
                return key
    raise ValueError(
        f"invalid key in {source}: expected {KEY_SIZE} bytes as base64 (44 characters), "
        f"{2 * KEY_SIZE} hex digits, or {KEY_SIZE} raw bytes"
    )


def _read_key_file(path: str) -> bytes:
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        data = f.read(4096)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "key file '%s' is accessible by group or others (mode %o); chmod 600 it",
            path,
            stat.S_IMODE(st.st_mode),
        )
    return parse_key(data, f"key file '{path}'")


def load_key(*, key_file: str | None = None, key_env: str | None = None) -> bytes:
    """The key from a file or an environment variable (exactly one). Raises ValueError/OSError."""
    if (key_file is None) == (key_env is None):
        raise ValueError("give exactly one of key_file or key_env")
    if key_file is not None:
        return _read_key_file(key_file)
    assert key_env is not None
    value = os.environ.get(key_env)
    if value is None or not value.strip():
        raise ValueError(f"environment variable '{key_env}' holding the key is not set")
    return parse_key(value, f"environment variable '{key_env}'")


def write_key_file(path: str, key: bytes | None = None) -> bytes:
    """Write a (new random) key to ``path`` with mode 0600; refuses to overwrite."""
    key = generate_key() if key is None else key
    if len(key) != KEY_SIZE:
        raise ValueError(f"a key is {KEY_SIZE} bytes")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (encode_key(key) + "\n").encode("ascii"))
    finally:
        os.close(fd)
    return key


# ------------------------------------------------------------------------------------------
# Files


def _file_key(key: bytes, salt: bytes) -> AESGCM:
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_FILE_KEY_INFO).derive(key)
    return AESGCM(derived)


def _nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def _aad(header: bytes, name: str) -> bytes:
    return header + b"\x00" + name.encode("utf-8")


def _read_exact(f: BinaryIO, n: int) -> bytes:
    chunks: list[bytes] = []
    remaining = n
    while remaining > 0:
        data = f.read(remaining)
        if not data:
            break
        chunks.append(data)
        remaining -= len(data)
    return b"".join(chunks)


def encrypt_file(
    key: bytes, src: str, dst: str, *, name: str | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> None:
    """Encrypt ``src`` into a new file ``dst``. ``name`` (default: ``src``'s file name) is
    bound into every chunk; decryption must use the same name."""
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size must be between 1 and {MAX_CHUNK_SIZE} bytes")
    name = os.path.basename(src) if name is None else name
    salt = os.urandom(16)
    header = _HEADER.pack(_MAGIC, key_id(key), chunk_size, salt)
    aead = _file_key(key, salt)
    aad = _aad(header, name)
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        fout.write(header)
        block = _read_exact(fin, chunk_size)
        index = 0
        while True:
            following = _read_exact(fin, chunk_size) if len(block) == chunk_size else b""
            last = not following
            fout.write(aead.encrypt(_nonce(index, last), block, aad))
            if last:
                break
            block = following
            index += 1


def decrypt_file(key: bytes, src: str, dst: str, *, name: str, display: str | None = None) -> None:
    """Decrypt ``src`` into a new file ``dst`` (mode 0600); raise AgentError naming ``display``.

    Every chunk is authenticated before it is written; on any failure ``dst`` is removed.
    """
    shown = display if display is not None else src
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fout, open(src, "rb") as fin:
            for plain in _decrypt_chunks(key, fin, name, shown):
                fout.write(plain)
    except BaseException:
        try:
            os.unlink(dst)
        except OSError:
            pass
        raise


def _decrypt_chunks(key: bytes, fin: BinaryIO, name: str, shown: str) -> Iterator[bytes]:
    header = _read_exact(fin, _HEADER.size)
    if len(header) < _HEADER.size or header[: len(_MAGIC)] != _MAGIC:
        raise AgentError(f"failed to decrypt '{shown}': not a shmserve encrypted file")
    _magic, file_key_id, chunk_size, salt = _HEADER.unpack(header)
    ours = key_id(key)
    if file_key_id != ours:
        raise AgentError(
            f"failed to decrypt '{shown}': wrong key (the file was encrypted with key id "
            f"{file_key_id.hex()}, the configured key has id {ours.hex()})"
        )
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise AgentError(f"failed to decrypt '{shown}': corrupt header (chunk size {chunk_size})")
    aead = _file_key(key, salt)
    aad = _aad(header, name)
    sealed = chunk_size + _TAG_SIZE
    block = _read_exact(fin, sealed)
    index = 0
    while True:
        following = _read_exact(fin, sealed) if len(block) == sealed else b""
        last = not following
        try:
            plain = aead.decrypt(_nonce(index, last), block, aad)
        except InvalidTag:
            raise AgentError(
                f"failed to decrypt '{shown}': authentication failed at chunk {index} "
                "(the file was modified, truncated, renamed or corrupted)"
            ) from None
        yield plain
        if last:
            return
        block = following
        index += 1


def _walk_files(root: str) -> Iterator[tuple[str, str]]:
    """(relative path, absolute path) of every entry below ``root`` that is not a directory,
    following directory symlinks once (loops are cut)."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        for filename in sorted(filenames):
            full = os.path.join(dirpath, filename)
            yield os.path.relpath(full, root), full


def decrypt_tree(src: str, dst: str, key: bytes) -> int:
    """Decrypt every ``*.enc`` file of model directory ``src`` into ``dst`` (dropping the
    suffix) and copy the other files; ``X.enc`` replaces a plaintext ``X``. Returns how many
    files were decrypted. Directories are made 0700, decrypted files 0600."""
    decrypted = 0
    for rel, full in _walk_files(src):
        directory, filename = os.path.split(rel)
        target_dir = os.path.join(dst, directory)
        os.makedirs(target_dir, mode=0o700, exist_ok=True)
        try:
            st = os.stat(full)
        except OSError as exc:
            logger.warning("decrypt: skipping '%s': %s", rel, exc)
            continue
        if not stat.S_ISREG(st.st_mode):
            logger.warning("decrypt: skipping '%s': not a regular file", rel)
            continue
        if filename.endswith(ENCRYPTED_SUFFIX) and len(filename) > len(ENCRYPTED_SUFFIX):
            plain_name = filename[: -len(ENCRYPTED_SUFFIX)]
            target = os.path.join(target_dir, plain_name)
            if os.path.lexists(target):  # a plaintext copy came first (sorted order)
                os.unlink(target)
            try:
                decrypt_file(key, full, target, name=plain_name, display=rel)
            except OSError as exc:
                raise AgentError(f"failed to decrypt '{rel}': {exc}") from exc
            decrypted += 1
        else:
            if os.path.exists(full + ENCRYPTED_SUFFIX):
                continue  # the encrypted version wins
            target = os.path.join(target_dir, filename)
            try:
                shutil.copy2(full, target)
            except OSError as exc:
                raise AgentError(
                    f"failed to copy '{rel}' to the decrypted location: {exc}"
                ) from exc
    return decrypted


# ------------------------------------------------------------------------------------------
# The agent


def _key_from_parameters(parameters: Mapping[str, str]) -> bytes:
    key_file = parameters.get("key_file")
    key_env = parameters.get("key_env")
    unknown = sorted(set(parameters) - {"key_file", "key_env"})
    if unknown:
        raise AgentError(
            "decrypt agent: unknown parameter(s) "
            + ", ".join(f"'{p}'" for p in unknown)
            + "; expected 'key_file' or 'key_env'"
        )
    if (key_file is None) == (key_env is None):
        raise AgentError(
            "decrypt agent needs exactly one of the parameters 'key_file' or 'key_env'"
        )
    if key_file is not None and not os.path.isabs(key_file):
        raise AgentError(f"decrypt agent: key_file must be an absolute path, got '{key_file}'")
    try:
        return load_key(key_file=key_file, key_env=key_env)
    except OSError as exc:
        raise AgentError(
            f"decrypt agent: cannot read key file '{key_file}': {os.strerror(exc.errno or 0)}"
        ) from exc
    except ValueError as exc:
        raise AgentError(f"decrypt agent: {exc}") from exc


class DecryptAgent(RepoAgent):
    """Decrypt a model's ``*.enc`` files into a private temporary location on LOAD."""

    def handle(self, action: Action, model: AgentContext) -> None:
        if action is not Action.LOAD:
            return  # the runner removes the temporary location
        key = _key_from_parameters(model.parameters)
        source = model.location
        target = model.acquire_temporary_location()
        count = decrypt_tree(source, target, key)
        if count == 0:
            logger.warning(
                "decrypt agent: model '%s' has no *.enc files at '%s'; serving it as is",
                model.model_name,
                source,
            )
        model.set_location(target)


# ------------------------------------------------------------------------------------------
# Encrypting a model


@dataclass
class EncryptResult:
    encrypted: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    #: True when the decrypt agent block was appended to the plaintext config.pbtxt
    agent_config_added: bool = False
    #: True when config.pbtxt already had a model_repository_agents section (left as is)
    config_has_agents: bool = False


def _pbtxt_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _agent_block(key_parameter: str, key_value: str) -> str:
    return (
        "model_repository_agents {\n"
        "  agents [\n"
        "    {\n"
        '      name: "decrypt"\n'
        f"      parameters [ {{ key: {_pbtxt_string(key_parameter)} "
        f"value: {_pbtxt_string(key_value)} }} ]\n"
        "    }\n"
        "  ]\n"
        "}\n"
    )


def encrypt_model(
    src_model_dir: str,
    dst_model_dir: str,
    *,
    key_file: str | None = None,
    key_env: str | None = None,
    encrypt_config: bool = False,
    add_agent_config: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> EncryptResult:
    """Write an encrypted copy of a model directory.

    Every file becomes ``<file>.enc`` except the top-level config.pbtxt, which stays
    plaintext (the server reads the agent list from it). When it has no
    ``model_repository_agents`` section, one naming the decrypt agent with ``key_file``
    (made absolute) or ``key_env`` is appended (unless ``add_agent_config`` is false).
    With ``encrypt_config`` the real config goes to ``config.pbtxt.enc`` and the plaintext
    config.pbtxt is only a stub: the model name plus the agent section.

    ``dst_model_dir`` must not exist or be empty. Raises ValueError/OSError.
    """
    key = load_key(key_file=key_file, key_env=key_env)
    src = os.path.abspath(src_model_dir)
    dst = os.path.abspath(dst_model_dir)
    if not os.path.isdir(src):
        raise ValueError(f"'{src_model_dir}' is not a directory")
    if dst == src or dst.startswith(src + os.sep):
        raise ValueError("the destination must not be inside the source model directory")
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise ValueError(f"'{dst_model_dir}' exists and is not an empty directory")
    os.makedirs(dst, exist_ok=True)

    if key_file is not None:
        agent_param = ("key_file", os.path.abspath(key_file))
    else:
        assert key_env is not None
        agent_param = ("key_env", key_env)

    result = EncryptResult()
    for rel, full in _walk_files(src):
        if not os.path.isfile(full):
            continue
        target_dir = os.path.join(dst, os.path.dirname(rel))
        os.makedirs(target_dir, exist_ok=True)
        if rel == CONFIG_FILE:
            with open(full, encoding="utf-8") as f:
                text = f.read()
            has_agents = "model_repository_agents" in text
            result.config_has_agents = has_agents
            if encrypt_config:
                if has_agents:
                    raise ValueError(
                        "config.pbtxt already has a model_repository_agents section; "
                        "--encrypt-config cannot write the plaintext stub for it"
                    )
                encrypt_file(
                    key,
                    full,
                    os.path.join(dst, CONFIG_FILE + ENCRYPTED_SUFFIX),
                    name=CONFIG_FILE,
                    chunk_size=chunk_size,
                )
                result.encrypted.append(rel)
                text = (
                    "# The model's configuration is in config.pbtxt.enc; the decrypt\n"
                    "# repository agent decrypts it when the model loads.\n"
                    f"name: {_pbtxt_string(os.path.basename(src))}\n"
                )
            if not has_agents and add_agent_config:
                text = text.rstrip("\n") + "\n\n" + _agent_block(*agent_param)
                result.agent_config_added = True
            with open(os.path.join(dst, CONFIG_FILE), "x", encoding="utf-8") as f:
                f.write(text)
            result.copied.append(rel)
            continue
        encrypt_file(
            key,
            full,
            os.path.join(target_dir, os.path.basename(rel) + ENCRYPTED_SUFFIX),
            name=os.path.basename(rel),
            chunk_size=chunk_size,
        )
        result.encrypted.append(rel)
    return result


ENCRYPT_SUMMARY = "encrypt a model for the 'decrypt' repository agent"
ENCRYPT_DESCRIPTION = (
    "Encrypt a model directory for the 'decrypt' repository agent (AES-256-GCM). "
    "Every file becomes <file>.enc except config.pbtxt, to which the decrypt agent "
    "section is added."
)


def main(argv: Sequence[str] | None = None) -> int:
    """``shmserve encrypt-model SRC DST --key-file F`` / ``--generate-key F``."""
    parser = argparse.ArgumentParser(prog="shmserve encrypt-model",
                                     description=ENCRYPT_DESCRIPTION)
    add_encrypt_arguments(parser)
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return run_encrypt(args, parser)


def add_encrypt_arguments(parser: argparse.ArgumentParser) -> None:
    """``shmserve encrypt-model``'s options, on the parser cli.py made for it."""
    parser.add_argument("src", nargs="?", help="the plaintext model directory")
    parser.add_argument("dst", nargs="?", help="the encrypted model directory to create")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--key-file", metavar="FILE", help="read the key from FILE")
    source.add_argument("--key-env", metavar="VAR", help="read the key from environment VAR")
    parser.add_argument(
        "--generate-key",
        metavar="FILE",
        help="write a new random key to FILE (mode 0600, never overwritten); "
        "with SRC and DST and no --key-file/--key-env, encrypt with it",
    )
    parser.add_argument(
        "--encrypt-config",
        action="store_true",
        help="also encrypt config.pbtxt (the plaintext one becomes a stub)",
    )
    parser.add_argument(
        "--no-agent-config",
        action="store_true",
        help="do not add the decrypt agent section to config.pbtxt",
    )
    parser.add_argument(
        "--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help=argparse.SUPPRESS
    )


def run_encrypt(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if (args.src is None) != (args.dst is None):
        parser.print_usage(sys.stderr)
        print("shmserve encrypt-model: error: give both SRC and DST", file=sys.stderr)
        return 2
    if args.src is None and args.generate_key is None:
        parser.print_usage(sys.stderr)
        print(
            "shmserve encrypt-model: error: give SRC DST and a key, or --generate-key FILE",
            file=sys.stderr,
        )
        return 2
    key_file: str | None = args.key_file
    key_env: str | None = args.key_env
    try:
        if args.generate_key is not None:
            if key_file is not None or key_env is not None:
                raise ValueError("--generate-key cannot be combined with --key-file/--key-env")
            write_key_file(args.generate_key)
            print(f"wrote a new key to {args.generate_key} (mode 0600)")
            key_file = args.generate_key
        if args.src is None:
            return 0
        if key_file is None and key_env is None:
            raise ValueError("give --key-file FILE, --key-env VAR or --generate-key FILE")
        result = encrypt_model(
            args.src,
            args.dst,
            key_file=key_file,
            key_env=key_env,
            encrypt_config=args.encrypt_config,
            add_agent_config=not args.no_agent_config,
            chunk_size=args.chunk_size,
        )
    except FileExistsError as exc:
        print(f"shmserve encrypt-model: error: '{exc.filename}' already exists", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"shmserve encrypt-model: error: {exc}", file=sys.stderr)
        return 1
    print(f"encrypted {len(result.encrypted)} file(s) into {args.dst}")
    if result.agent_config_added:
        print("added the decrypt repository agent to config.pbtxt")
    elif result.config_has_agents:
        print(
            "config.pbtxt already has model_repository_agents; make sure it lists "
            '{ name: "decrypt" } with the key parameter'
        )
    return 0
