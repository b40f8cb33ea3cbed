"""`push_to_hub` for compressed models: factorised weights, config and the FWSVD model card in one commit.

transformers' own `push_to_hub` saves into a temporary folder and then overwrites `README.md` with the repo's
existing card or a generic one; for a compressed model we keep the card `save_pretrained` wrote (filled from the
run), add the caller's tags to it, and delete weight files left on the repo by an earlier push (a stale dense
`model.safetensors` would otherwise be what plain transformers loads).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

__all__ = ["push_compressed_to_hub"]

logger = logging.getLogger(__name__)

_WEIGHT_FILES = re.compile(r"^(model|pytorch_model)(\.fwsvd)?(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?$")


def _stale_weight_files(api: Any, repo_id: str, revision: str | None, token: Any, keep: set[str]) -> list[str]:
    try:
        remote = api.list_repo_files(repo_id, revision=revision, token=token)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return []
    return sorted(name for name in remote if _WEIGHT_FILES.match(name) and name not in keep)


def push_compressed_to_hub(
    model: Any,
    repo_id: str,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
) -> Any:
    """Upload a compressed model (weights, config, model card) to `repo_id`; same arguments as transformers'.

    Returns:
        The `huggingface_hub.CommitInfo` of the upload commit (`None` on processes other than the main one).
    """
    from transformers.utils.hub import hf_api

    from .distributed import is_main_process
    from .model_card import write_model_card

    if not is_main_process():  # under accelerate/torchrun only the main process saves and uploads
        logger.info("Not the main process: skipping push_to_hub of the FWSVD checkpoint to %s", repo_id)
        return None
    api = hf_api()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp_dir:
        model.save_pretrained(tmp_dir, max_shard_size=max_shard_size, model_card=False)
        write_model_card(model, tmp_dir, load_path=repo_id, tags=tags)
        names = sorted(os.listdir(tmp_dir))
        operations: list[Any] = [
            CommitOperationAdd(path_or_fileobj=os.path.join(tmp_dir, name), path_in_repo=name) for name in names
        ]
        stale = _stale_weight_files(api, repo_id, revision, token, set(names))
        operations += [CommitOperationDelete(path_in_repo=name) for name in stale]
        if stale:
            logger.info("Deleting stale weight files from %s: %s", repo_id, ", ".join(stale))
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message or "Upload FWSVD-compressed model",
            commit_description=commit_description,
            token=token,
            create_pr=create_pr,
            revision=revision,
        )
