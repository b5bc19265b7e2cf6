"""Hugging Face Hub models: ``tune download REPO_ID`` and ``checkpoint_dir: hf://ORG/NAME``.

Everything goes through ``huggingface_hub`` (``snapshot_download``): the local hub cache layout,
``HF_HUB_OFFLINE`` / ``local_files_only``, tokens (``HF_TOKEN``), mirrors (``HF_ENDPOINT``).
Only the files a checkpoint needs are fetched by default: safetensors (+ index), config, generation
config and tokenizer files; ``pytorch_model*.bin`` only when the repo has no safetensors.
Errors from the library (gated repo, missing repo or revision, no network) become a
:class:`HubError` that says what to do. ``huggingface_hub`` is imported inside the functions: it is
an optional dependency (``pip install 'tinytune[hf]'``).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

from tinytune.errors import TinytuneError

HF_PREFIX = "hf://"

# What a tinytune checkpoint directory needs (see tinytune.checkpoint.hf_writer.TOKENIZER_FILES).
CHECKPOINT_PATTERNS = (
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# Fallback weights when a repo has no safetensors.
BIN_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")


class HubError(TinytuneError, ValueError):
    """A hub download or lookup failed; the message names the repo and what to do."""


def _hub():
    try:
        import huggingface_hub  # noqa: PLC0415  (optional dependency)
    except ImportError:
        raise HubError("Hugging Face Hub access needs huggingface_hub: pip install 'tinytune[hf]'") from None
    return huggingface_hub


def models_dir(home: str | None = None) -> str:
    """``$TINYTUNE_HOME/models`` (default ``~/.cache/tinytune/models``)."""
    home = home or os.environ.get("TINYTUNE_HOME", "~/.cache/tinytune")
    return os.path.join(os.path.abspath(os.path.expanduser(home)), "models")


def default_output_dir(repo_id: str, home: str | None = None) -> str:
    """Where ``tune download ORG/NAME`` puts the model: ``$TINYTUNE_HOME/models/ORG/NAME``."""
    return os.path.join(models_dir(home), *repo_id.split("/"))


def parse_hf_uri(uri: str) -> tuple[str, str | None]:
    """``hf://ORG/NAME`` or ``hf://ORG/NAME@REVISION`` -> ``(repo_id, revision)``.

    Raises:
        HubError: not of that form.
    """
    if not uri.startswith(HF_PREFIX):
        raise HubError(f"{uri!r} is not an hf:// address (hf://ORG/NAME or hf://ORG/NAME@REVISION)")
    rest = uri[len(HF_PREFIX) :]
    repo_id, _, revision = rest.partition("@")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise HubError(f"{uri!r}: expected hf://ORG/NAME (e.g. hf://Qwen/Qwen3-0.6B), optionally @REVISION")
    return repo_id, revision or None


def explain_hub_error(exc: BaseException, repo_id: str, revision: str | None = None, kind: str = "model") -> str | None:
    """A one-line explanation (with the fix) for an exception ``huggingface_hub`` raised, or None.

    Args:
        exc: the exception.
        repo_id: the repo that was asked for.
        revision: the revision asked for.
        kind: ``model`` or ``dataset`` (for the message and the URL).
    """
    errors = _hub().errors
    url = f"https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{repo_id}"
    if isinstance(exc, errors.GatedRepoError):  # a subclass of RepositoryNotFoundError: check first
        return (
            f"{kind} {repo_id!r} is gated: accept its terms at {url} while logged in, then pass "
            "--hf-token TOKEN or set HF_TOKEN (a read token from https://huggingface.co/settings/tokens)"
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"{kind} {repo_id!r} has no revision {revision!r}; check the branch, tag or commit at {url}"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return (
            f"{kind} {repo_id!r} does not exist on the Hugging Face Hub (or is private: pass --hf-token / "
            f"set HF_TOKEN); check the spelling at {url}"
        )
    if isinstance(exc, errors.HFValidationError):
        return f"{repo_id!r} is not a valid Hugging Face repo id (ORG/NAME): {exc}"
    if isinstance(exc, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        return (
            f"{kind} {repo_id!r}{f' @ {revision}' if revision else ''} is not in the local hub cache and the hub "
            "cannot be reached (no network, or HF_HUB_OFFLINE=1): connect and rerun, or download it on a machine "
            "with network (`tune download REPO_ID --output-dir DIR`) and point the config at DIR"
        )
    return None


def _snapshot(repo_id: str, **kwargs) -> str:
    hub = _hub()
    try:
        return hub.snapshot_download(repo_id, **kwargs)
    except Exception as e:  # huggingface_hub's errors (and httpx's) have no common base; map what we know
        msg = explain_hub_error(e, repo_id, kwargs.get("revision"))
        if msg is None:
            raise HubError(f"downloading {repo_id!r} failed: {type(e).__name__}: {e}") from e
        raise HubError(msg) from None


def _has_safetensors(path: str) -> bool:
    return bool(glob.glob(os.path.join(path, "*.safetensors")))


def download_model(
    repo_id: str,
    output_dir: str | None = None,
    *,
    revision: str | None = None,
    token: str | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
    endpoint: str | None = None,
) -> str:
    """Downloads the checkpoint files of a hub model repo.

    Args:
        repo_id: ``ORG/NAME``.
        output_dir: a plain directory to put the files in; None keeps them in the hub cache
            (``cache_dir``, default ``HF_HUB_CACHE``) and returns the snapshot directory.
        revision: branch, tag or commit (default ``main``).
        token: access token (default: ``HF_TOKEN`` / the saved login).
        include: glob patterns to fetch instead of :data:`CHECKPOINT_PATTERNS`.
        exclude: glob patterns to skip.
        cache_dir: hub cache directory.
        local_files_only: never touch the network (the cache must hold the snapshot).
        endpoint: hub URL (default ``HF_ENDPOINT`` or huggingface.co).

    Returns:
        The directory holding the files.

    Raises:
        HubError: gated repo without a token, missing repo or revision, no network, bad id.
    """
    kwargs = dict(
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_dir=output_dir,
        local_files_only=local_files_only,
        ignore_patterns=list(exclude) if exclude else None,
        endpoint=endpoint,
    )
    path = _snapshot(repo_id, allow_patterns=list(include or CHECKPOINT_PATTERNS), **kwargs)
    if include is None and not _has_safetensors(path):  # an older repo: PyTorch .bin weights only
        path = _snapshot(repo_id, allow_patterns=list(CHECKPOINT_PATTERNS + BIN_PATTERNS), **kwargs)
    return path


def resolve_hf_checkpoint(
    uri: str, *, cache_dir: str | None = None, token: str | None = None, home: str | None = None
) -> str:
    """The local checkpoint directory for ``hf://ORG/NAME[@REVISION]``.

    Order: a ``tune download`` directory (``$TINYTUNE_HOME/models/ORG/NAME``, no revision given),
    then the hub cache without network, then a download into the hub cache (unless
    ``HF_HUB_OFFLINE=1``).

    Raises:
        HubError: the address is malformed, or the model is neither local nor downloadable.
    """
    repo_id, revision = parse_hf_uri(uri)
    local = default_output_dir(repo_id, home)
    if revision is None and os.path.isfile(os.path.join(local, "config.json")):
        return local
    errors = _hub().errors
    try:
        return _hub().snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=True,
            allow_patterns=list(CHECKPOINT_PATTERNS),
        )
    except (errors.LocalEntryNotFoundError, errors.IncompleteSnapshotError):
        pass  # not cached (completely): download it
    return download_model(repo_id, revision=revision, token=token, cache_dir=cache_dir)
