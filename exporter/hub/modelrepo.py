"""A model repository per run, laid out as EleutherAI's Pythia model repositories.

``EleutherAI/pythia-160m`` and its siblings hold one branch per checkpoint (``step0``,
``step1`` ... ``step143000``), each a complete ``transformers`` folder (config, weights,
tokenizer files), with ``main`` at the final step; ``from_pretrained(REPO,
revision="step1000")`` loads any of them. This module publishes an archive's steps the same
way: branch ``step{N}`` gets ``config.json``, ``generation_config.json``, the model weights
(``model.safetensors``, or its shards and index) and the tokenizer files when given; ``main``
gets the last step and a model card that links the dataset.

Resumable and idempotent as the dataset push is (:class:`exporter.hub.publish.Publisher`): every
branch is compared with the archive's sha256s first, only missing files are committed, a commit
whose response was lost is recognised, and transient Hub errors are retried
(:func:`exporter.hub.calls.retry`). Branches are created from the repository's first commit, so a
branch made after ``main`` holds weights never inherits them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pyarrow.parquet as pq

from exporter.archive.layout import (
    CONFIG,
    checkpoint_index_path,
    manifest_path,
    step_dir,
    step_prefix,
)
from exporter.errors import PublishError
from exporter.files import file_sha256
from exporter.hub import calls
from exporter.hub.calls import RetryPolicy
from exporter.hub.files import LocalFile
from exporter.hub.publish import Publisher, PushEvent

T = TypeVar("T")

REPO_TYPE = "model"
#: tokenizer files transformers reads (``tokenization_utils_base.py``, ``VOCAB_FILES_NAMES``
#: of the GPT-NeoX fast tokenizer), copied when present
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json")


def step_branch(step: int) -> str:
    """The branch of a step, as Pythia names them: ``step1000``."""
    return f"step{step}"


@dataclass
class ModelPushResult:
    """What a model repository push did: branch -> commit made (None: already up to date)."""

    repo_id: str
    url: str
    branches: dict[str, str | None] = field(default_factory=dict)

    @property
    def commits(self) -> list[str]:
        return [c for c in self.branches.values() if c is not None]


def _generation_config(config: dict[str, object]) -> bytes:
    """``generation_config.json`` as ``GenerationConfig.from_model_config`` derives it from
    ``config.json`` (transformers ``generation/configuration_utils.py``): the special tokens."""
    keys = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    data: dict[str, object] = {k: config[k] for k in keys if config.get(k) is not None}
    data["_from_model_config"] = True
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def step_model_files(root: Path, step: int, tokenizer: dict[str, Path]) -> list[LocalFile]:
    """The files of branch ``step{N}``: the step's config and weights (sha256 from the
    checkpoint index), a generation config, and the tokenizer files."""
    index = checkpoint_index_path(root, step)
    if not index.is_file():
        raise PublishError(f"{root}: step {step} has no checkpoint index; build it first")
    prefix = step_prefix(step) + "/"
    files = []
    for entry in pq.read_table(index).to_pylist()[0]["output_files"]:
        name = entry["path"].removeprefix(prefix)
        if name == CONFIG or (name.startswith("model") and "/" not in name):
            files.append(LocalFile(name, root / entry["path"], entry["sha256"], entry["bytes"]))
    names = {f.path for f in files}
    if CONFIG not in names or not any(n.endswith(".safetensors") for n in names):
        raise PublishError(f"{root}: step {step} has no model weights (build with --include model)")
    if "generation_config.json" not in names:
        config = json.loads((step_dir(root, step) / CONFIG).read_text(encoding="utf-8"))
        files.append(LocalFile.of_bytes("generation_config.json", _generation_config(config)))
    files += [LocalFile(name, path, file_sha256(path), path.stat().st_size)
              for name, path in sorted(tokenizer.items())]
    return files


def tokenizer_files(spec: str | None, token: str | None = None) -> dict[str, Path]:
    """Tokenizer files from a folder, a ``tokenizer.json``, or a Hub model ``hf://ORG/NAME``.

    Raises:
        PublishError: nothing usable found.
    """
    if spec is None:
        return {}
    found: dict[str, Path] = {}
    if spec.startswith("hf://"):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

        repo_id, _, revision = spec.removeprefix("hf://").partition("@")
        for name in TOKENIZER_FILES:
            try:
                found[name] = Path(calls.retry(lambda name=name: hf_hub_download(
                    repo_id, name, revision=revision or None, token=token),
                    what=f"download {name} of {spec}", error=PublishError))
            except EntryNotFoundError:
                continue
            except RepositoryNotFoundError as exc:
                raise PublishError(f"--tokenizer {spec}: no such model repository "
                                   f"(or no access to it)") from exc
    else:
        path = Path(spec)
        if path.is_file():
            found[path.name] = path
        elif path.is_dir():
            found = {n: path / n for n in TOKENIZER_FILES if (path / n).is_file()}
    if not found.keys() & {"tokenizer.json", "vocab.json"}:
        raise PublishError(f"--tokenizer {spec}: no tokenizer.json or vocab.json there")
    return found


def model_card(repo_id: str, steps: list[int], dataset_repo: str | None) -> bytes:
    """The model card of ``main``: which branches exist and how to load them."""
    lines = ["---", "library_name: transformers", "tags:", "- gpt_neox", "- checkpoints"]
    if dataset_repo:
        lines += ["datasets:", f"- {dataset_repo}"]
    lines += ["---", "", f"# {repo_id.split('/')[-1]}", "",
              f"A GPT-NeoX model at {len(steps)} training steps, one branch per step "
              f"({', '.join(step_branch(s) for s in steps[:6])}{', …' if len(steps) > 6 else ''}) "
              f"as in EleutherAI's Pythia repositories; `main` is step {steps[-1]}.", "",
              "```python", "from transformers import GPTNeoXForCausalLM", "",
              f"model = GPTNeoXForCausalLM.from_pretrained(\"{repo_id}\", "
              f"revision=\"{step_branch(steps[0])}\")", "```", ""]
    if dataset_repo:
        lines += [f"The full checkpoints (optimizer state, statistics, engine state) are the "
                  f"dataset [{dataset_repo}](https://huggingface.co/datasets/{dataset_repo}).", ""]
    return "\n".join(lines).encode()


def push_model_repo(root: str | Path, repo_id: str, *, steps: Iterable[int] | None = None,
                    tokenizer: str | None = None, dataset_repo: str | None = None,
                    private: bool = False, token: str | None = None,
                    retry: RetryPolicy | None = None,
                    progress: Callable[[PushEvent], None] | None = None) -> ModelPushResult:
    """Publish each step of an archive as branch ``step{N}`` of the model repository ``repo_id``.

    Args:
        root: the archive folder (built with ``--include model``).
        repo_id: ``ORG/NAME`` of the model repository (created if missing).
        steps: the steps to publish (every completed step when None); ``main`` gets the last.
        tokenizer: tokenizer files to add to every branch: a folder, a ``tokenizer.json``, or a
            Hub model ``hf://ORG/NAME``.
        dataset_repo: the archive's dataset repository, linked from the model card.
        private: create the repository private.
        token: Hub token (``HF_TOKEN`` or the saved login when None).
        retry: backoff for transient errors.
        progress: called with a ``commit`` or ``skip`` :class:`PushEvent` per branch.

    Returns:
        Each branch and the commit made on it (None when it was up to date).

    Raises:
        PublishError: a step without model weights, a Hub error past the retry budget.

    Example:
        >>> result = push_model_repo("archive", "me/pythia-tiny")           # doctest: +SKIP
        >>> sorted(result.branches)                                          # doctest: +SKIP
        ['main', 'step0', 'step1', 'step2', 'step4', 'step8']
        >>> GPTNeoXForCausalLM.from_pretrained("me/pythia-tiny", revision="step8")  # doctest: +SKIP
    """
    root = Path(root)
    manifest = json.loads(manifest_path(root).read_text(encoding="utf-8"))
    wanted = sorted(int(s) for s in manifest["steps"]) if steps is None else sorted(set(steps))
    if not wanted:
        raise PublishError(f"{root}: no completed steps to publish")
    tokens = tokenizer_files(tokenizer, token)
    files = {step: step_model_files(root, step, tokens) for step in wanted}
    policy = retry or RetryPolicy()
    report = progress or (lambda event: None)

    def hub(what: str, fn: Callable[[], T]) -> T:
        return calls.hub_call(fn, what=f"{what} ({repo_id})", repo_id=repo_id, policy=policy,
                              error=PublishError)

    def publisher(branch: str) -> Publisher:
        return Publisher(root, repo_id, revision=branch, token=token, retry=policy,
                         repo_type=REPO_TYPE, private=private)

    api = publisher("main").api
    hub("create the repository", lambda: api.create_repo(
        repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True))
    first = hub("read the history", lambda: api.list_repo_commits(
        repo_id, repo_type=REPO_TYPE))[-1].commit_id
    result = ModelPushResult(repo_id, f"{api.endpoint}/{repo_id}")
    for step in wanted:
        branch = step_branch(step)
        hub(f"create branch {branch}", lambda branch=branch: api.create_branch(
            repo_id, repo_type=REPO_TYPE, branch=branch, revision=first, exist_ok=True))
        commit = publisher(branch).commit_files(files[step], f"Add step {step}")
        result.branches[branch] = commit
        report(PushEvent("commit" if commit else "skip", (step,), commit, branch))
    card = LocalFile.of_bytes("README.md", model_card(repo_id, wanted, dataset_repo))
    commit = publisher("main").commit_files([*files[wanted[-1]], card],
                                            f"Step {wanted[-1]} and model card")
    result.branches["main"] = commit
    report(PushEvent("commit" if commit else "skip", (wanted[-1],), commit, "main"))
    return result
